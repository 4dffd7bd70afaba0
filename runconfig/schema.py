"""The run configuration's schema: one YAML file's sections as pydantic models.

The single source of truth for what a config may say: the config reference (docs/reference.md) is
generated from these models (`raylaunch config reference`), loading and the checks against the world are
`launcher.config` and `launcher.checks`. Every layer may import this package (it imports no other
of raylaunch's): lower layers read the sections they need from it, typed.
"""

from __future__ import annotations

import math
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGES = ("preprocess", "train", "tune", "distill", "quantize", "evaluate")
IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")
"""`package.module:function`: a user's builder or loss."""
# The transforms drawn afresh every epoch by the training workers (not cached, not in the cache key).
AUGMENTATIONS = ("random_crop", "flip", "rotate", "brightness")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class JobConfig(Section):
    pip: list[str] | str | None = None
    """For `raylaunch submit`: packages the job installs on the cluster first (a list of requirements, or a requirements file); null: the cluster's Python already has raylaunch's dependencies."""
    image_uri: str | None = None
    """For `raylaunch submit`: a container image whose Python runs the job (Ray's `image_uri` runtime env); not together with `pip`."""
    excludes: list[str] = []
    """For `raylaunch submit`: more paths (gitignore syntax) left out of the uploaded working directory, beyond .venv, .git, runs and caches."""
    env_vars: dict[str, str] = {}
    """For `raylaunch submit`: environment variables of the job's processes."""

    @model_validator(mode="after")
    def _one_python(self):
        if self.pip and self.image_uri:
            raise ValueError("pip and image_uri: give one; the image's Python already has its packages (bake them into the image)")
        return self


class ClusterConfig(Section):
    address: str | None = None
    """Ray address to join (`auto`, `ray://host:10001`); null starts an embedded local Ray, or joins the cluster a `ray job submit` runs in."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs the embedded local Ray may use; null means all of this machine's."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one GPU, for the preflight plan and `train.zero.stage: auto`; null detects it (GPU workers only)."""
    worker_memory_gb: float | None = Field(None, gt=0)
    """Memory one CPU worker may use, for the plan and `zero.stage: auto` on CPU; null divides the cluster's memory among the workers."""
    job: JobConfig = JobConfig()
    """How `raylaunch submit` runs this config as a Ray job."""


# ---------------------------------------------------------------------------------------------
# Data: sources and the transforms applied to them. Transforms are a list, applied in order;
# those that change every epoch (augmentations) run at training time and so come last.


class Standardize(Section):
    type: Literal["standardize"] = "standardize"
    """Subtract the mean and divide by the standard deviation, both fitted on the train split."""
    per: Literal["feature", "channel"] = "feature"
    """`feature`: one mean/std per feature (per pixel of an image); `channel`: one per image channel."""


class MinMax(Section):
    type: Literal["minmax"] = "minmax"
    """Scale to [0, 1] by the minimum and maximum fitted on the train split."""
    per: Literal["feature", "channel"] = "feature"
    """`feature`: one min/max per feature (per pixel of an image); `channel`: one per image channel."""


class LabelEncode(Section):
    type: Literal["label_encode"] = "label_encode"
    """Labels to class indices 0..n-1. Always applied to classification data; list it to fix the order."""
    classes: list[str | int] | None = None
    """Class order (index 0 first); null sorts the labels found. A label not listed is a bad row."""


class Resize(Section):
    type: Literal["resize"] = "resize"
    """Resize every image (bilinear) when it is decoded."""
    size: tuple[int, int]
    """Height and width in pixels."""


class RandomCrop(Section):
    type: Literal["random_crop"] = "random_crop"
    """Augmentation: a random `size` crop of the image zero-padded by `padding`, redrawn every epoch."""
    size: tuple[int, int]
    """Height and width of the crop; the model sees images of this size."""
    padding: int = Field(0, ge=0, le=1024)
    """Zero pixels added on each side before cropping."""


class Flip(Section):
    type: Literal["flip"] = "flip"
    """Augmentation: mirror half the images, redrawn every epoch."""
    horizontal: bool = True
    """Flip left-right with probability 1/2."""
    vertical: bool = False
    """Flip top-bottom with probability 1/2."""


class Rotate(Section):
    type: Literal["rotate"] = "rotate"
    """Augmentation: rotate by an angle drawn uniformly from [-degrees, degrees], redrawn every epoch."""
    degrees: float = Field(gt=0, le=180)
    """Largest rotation either way."""


class Brightness(Section):
    type: Literal["brightness"] = "brightness"
    """Augmentation: multiply the image by a factor drawn uniformly from [1 - max_delta, 1 + max_delta]."""
    max_delta: float = Field(gt=0, le=1)
    """Largest relative change of brightness."""


class Tokenize(Section):
    type: Literal["tokenize"] = "tokenize"
    """Text to token ids."""
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    """`bytes`: every byte is a token (vocab 256); `bpe`: a byte-level BPE (Hugging Face `tokenizers`) trained on the train split."""
    vocab_size: int = Field(1024, ge=257, le=65536)
    """bpe: vocabulary size, including the 256 byte tokens."""


class Pack(Section):
    type: Literal["pack"] = "pack"
    """Cut each text's tokens into blocks of model.seq_len + 1 (inputs and next-token labels); a text's tail shorter than a block is dropped."""


TRANSFORMS = (Standardize, MinMax, LabelEncode, Resize, RandomCrop, Flip, Rotate, Brightness, Tokenize, Pack)
Transform = Annotated[typing.Union[TRANSFORMS], Field(discriminator="type")]
TRANSFORM_TYPES = {model.model_fields["type"].default: model for model in TRANSFORMS}
TEXT_TRANSFORMS = ("tokenize", "pack")


ROLES = ("system", "user", "assistant")


class Instructions(Section):
    prompt_column: str = "prompt"
    """Column holding each example's prompt (the user's turn)."""
    response_column: str = "response"
    """Column holding the reply the model learns to give: only its tokens carry a loss."""
    system_column: str | None = None
    """Optional column holding a system message that goes before the prompt."""
    messages_column: str | None = None
    """Instead of prompt and response: a column of conversations, lists of `{role, content}` turns (roles system, user, assistant; JSON text in CSV); every assistant turn is learned, the rest is context."""
    template: dict[str, str] | None = None
    """Per role, the text a turn becomes, `{content}` standing for what it says (`{user: "### Instruction:\\n{content}\\n\\n", assistant: "### Response:\\n{content}"}`); an assistant turn's text before `{content}` is prompt, its content and the rest (then the end-of-text token) are learned. Saved with the tokenizer as its chat template. null: the tokenizer's own chat template, or these Alpaca-style headers where it has none."""

    @model_validator(mode="after")
    def _consistent(self) -> Instructions:
        pair = [f for f in ("prompt_column", "response_column", "system_column") if f in self.model_fields_set]
        if self.messages_column is not None and pair:
            raise ValueError(f"instructions.{pair[0]}: conversations come from messages_column alone; drop {pair[0]}")
        for role, text in (self.template or {}).items():
            if role not in ROLES:
                raise ValueError(f"instructions.template: unknown role {role!r} (roles: {', '.join(ROLES)})")
            if text.count("{content}") != 1:
                raise ValueError(f"instructions.template: the {role} turn must hold {{content}} once (got {text!r})")
        return self


class DataConfig(Section):
    source: str | list[str] = "sklearn:digits"
    """Where the data is: `sklearn:digits` / `sklearn:breast_cancer` / `sklearn:wine` / `sklearn:iris`, or one or more files, folders or globs, local or a URI pyarrow knows (`s3://`, `gs://`, `file://`); for text, `python-stdlib` is this Python's own library sources."""
    format: Literal["auto", "parquet", "csv", "jsonl", "text", "images", "python"] = "auto"
    """`auto` goes by the file extensions. `images`: a folder with one subfolder per class (the label is the subfolder's name). `text`: files read as text for the language model. `python`: Python files as instruction pairs (data.instructions: each documented function's signature and docstring is a prompt, the rest of its body the response; `python-stdlib` is this Python's library)."""
    text_glob: str = "**/*"
    """text and images: which files under a source folder to read (a glob, `**` recursive)."""
    text_column: str | None = None
    """Parquet, CSV, JSONL: the column holding text. A language model packs the rows' texts as documents; a sequence classifier (`model.task`) reads each row's text, truncated or padded to model.seq_len, with its label_column."""
    instructions: Instructions | None = None
    """Parquet, CSV, JSONL: instruction or chat data for fine-tuning a transformers causal LM (`{}` takes the defaults: `prompt` and `response` columns). Rendered as the model's chat, tokenized with its tokenizer; the loss is on the responses only."""
    pack: bool = False
    """instructions: several examples per sequence of model.seq_len, each attending only to itself (position ids restart per example, for transformers models whose attention separates such sequences; other models get one example per sequence, padded)."""
    label_column: str = "label"
    """Column holding the class label (any type; see the `label_encode` transform)."""
    feature_columns: list[str] | None = None
    """Numeric feature columns; null means every column except the label and key columns."""
    key_column: str | None = None
    """Column whose value identifies a row, for the split; null hashes the row's content (tables), its file path (images) or file and position (text)."""
    image_shape: list[int] | None = None
    """Channels, height, width to reshape tabular features into for a CNN; digits sets [1, 8, 8] itself; image folders set it from the images."""
    transforms: list[Transform] = []
    """Applied in order: `standardize`, `minmax`, `label_encode`, `resize`, `random_crop`, `flip`, `rotate`, `brightness`, `tokenize`, `pack`. Each entry is a name or a mapping with `type` and its options; augmentations (random_crop, flip, rotate, brightness) are redrawn every epoch and come last. Text defaults to [tokenize, pack]."""
    val_fraction: float = Field(0.15, gt=0, lt=1)
    """Share of rows held out for validation."""
    test_fraction: float = Field(0.15, gt=0, lt=1)
    """Share of rows held out for the final test."""
    seed: int = 0
    """Seed of the split (a row's split is a keyed hash of its key and this seed) and of the augmentations."""
    on_bad_rows: Literal["fail", "skip"] = "fail"
    """A row that cannot be read (a non-numeric feature, an unknown label, an unreadable image): `fail` stops with the file and row; `skip` drops it and counts it per file in summary.json."""
    batch_size: int = Field(256, ge=1)
    """Rows per Ray Data `map_batches` call while preprocessing tables. (Images go by size: up to 64 MB of decoded pixels per task, at least 4 tasks per CPU; text by 16 files per task.)"""
    concurrency: int | None = Field(None, ge=1)
    """Ray Data tasks preprocessing at once; null lets Ray Data decide from the cluster's CPUs."""
    cache_dir: str | None = None
    """Where preprocessed datasets are kept, keyed by their inputs and transforms; null is `.cache/data` beside output.dir."""
    ingest_memory_mb: int | None = Field(None, ge=1)
    """Object store memory Ray Data may hold while streaming the training data to the workers; null is Ray Data's default."""
    shuffle_buffer: int = Field(10_000, ge=1)
    """Rows each training worker holds to shuffle the rows it streams: a fresh order every epoch, seeded by train.seed and the epoch (so a resume sees the same order). The larger, the closer to a full shuffle; the cost is that many rows in each worker's memory. A split held in memory (data.in_memory) is shuffled whole instead."""
    in_memory: Literal["auto", True, False] = "auto"
    """Hold the train and val splits in Ray's object store for training instead of reading their cached files every epoch (each rank reads its own shard once; epochs start without read tasks). `auto`: when the splits and each concurrent run's copy fit in 1/4 of the object store (and data.ingest_memory_mb). summary.json records the choice; a `--resume` that would choose otherwise is refused."""

    @field_validator("transforms", mode="before")
    @classmethod
    def _names_are_transforms(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"type": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("test_fraction: val_fraction + test_fraction must be below 0.9 to leave rows to train on")
        if self.image_shape is not None and (len(self.image_shape) != 3 or min(self.image_shape) < 1):
            raise ValueError("image_shape: must be three positive integers [channels, height, width]")
        kinds = [t.type for t in self.transforms]
        first_augmentation = next((i for i, k in enumerate(kinds) if k in AUGMENTATIONS), len(kinds))
        for i, kind in enumerate(kinds):
            if i > first_augmentation and kind not in AUGMENTATIONS:
                raise ValueError(f"transforms: {kind} (entry {i}) follows the augmentation {kinds[first_augmentation]} "
                                 f"(entry {first_augmentation}); augmentations are redrawn every epoch at training time, so list them last")
            if kinds.count(kind) > 1:
                raise ValueError(f"transforms: {kind} is listed {kinds.count(kind)} times; list it once")
        if "standardize" in kinds and "minmax" in kinds:
            raise ValueError("transforms: standardize and minmax both scale the features; keep one")
        scaler = next((t for t in self.transforms if t.type in ("standardize", "minmax")), None)
        if scaler is not None and scaler.per == "feature" and "random_crop" in kinds:
            raise ValueError(f"transforms: {scaler.type} per feature fits one statistic per pixel position, which random_crop "
                             f"moves every epoch; use {{type: {scaler.type}, per: channel}}")
        if self.instructions is not None and (self.format in ("text", "images") or self.text_column is not None):
            raise ValueError("instructions: instruction data is a table (Parquet, CSV, JSONL) of its own columns, not "
                             "data.format text or images, nor with text_column")
        if self.instructions is not None and self.transforms:
            raise ValueError("transforms: instruction data is tokenized by the model's own tokenizer; leave transforms empty")
        if self.format == "python" and self.instructions is None:
            raise ValueError("format: python reads functions as instruction pairs; set data.instructions: {}")
        if self.pack and self.instructions is None:
            raise ValueError("pack: packs instruction examples (data.instructions); text files and a text_column are "
                             "always packed into blocks")
        if self.text_column is not None and self.format in ("text", "images"):
            raise ValueError(f"text_column: names a column of a table (Parquet, CSV, JSONL), not of data.format {self.format}")
        text = self.is_text
        wrong = [k for k in kinds if (k in TEXT_TRANSFORMS) != text or (text and k == "label_encode")]
        if wrong:
            kind = "text (data.format: text, or data.text_column)" if text else "tables and images"
            raise ValueError(f"transforms: {', '.join(wrong)} cannot apply to {kind}")
        if text and kinds and kinds not in (["tokenize", "pack"], ["tokenize"]):
            raise ValueError("transforms: text takes [tokenize, pack], in that order (a classifier's rows: [tokenize])")
        return self

    @property
    def is_text(self) -> bool:
        """Text files, or a table's text column: tokenized rather than read as numbers."""
        return self.format == "text" or self.text_column is not None or self.instructions is not None



class Lora(Section):
    r: int = Field(8, ge=1, le=4096)
    """Rank of each adapter (the low-rank update's inner width)."""
    alpha: float = Field(16.0, gt=0)
    """Scale of the update: it is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Which layers get adapters: module names or name suffixes (`[q_proj, v_proj]`), or `all-linear` (every linear layer but the output head, PEFT's shorthand)."""


class ModelConfig(Section):
    type: Literal["cnn", "mlp", "gpt", "hf", "python"] = "cnn"
    """Model family: `cnn` for images, `mlp` for tabular rows, `gpt` (decoder-only transformer) for text, `hf` any Hugging Face transformers causal LM (`name_or_path` or `hf_config`), `python` your own `nn.Module` (`builder`)."""
    width: int = Field(32, ge=1, le=4096)
    """cnn/mlp: channels of the first conv block (doubling per block), or units per MLP hidden layer."""
    depth: int = Field(2, ge=1, le=8)
    """cnn/mlp: conv blocks or hidden layers."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout (before the classifier head; in every gpt block)."""
    n_layer: int = Field(2, ge=1, le=256)
    """gpt: transformer blocks."""
    n_head: int = Field(2, ge=1, le=256)
    """gpt: attention heads; must divide d_model."""
    d_model: int = Field(64, ge=8, le=65536)
    """gpt: embedding width."""
    seq_len: int = Field(128, ge=2, le=1 << 20)
    """gpt, hf: tokens per training sequence (the text is packed into blocks of this length; a classifier's rows are truncated or padded to it)."""
    task: Literal["auto", "causal_lm", "sequence_classification"] = "auto"
    """hf: `causal_lm` (next-token prediction) or `sequence_classification` (a label per text: data.text_column and data.label_column); `auto`: sequence_classification where the table has the label column, else causal_lm."""
    name_or_path: str | None = None
    """hf: a folder in `save_pretrained` layout (config.json, safetensors weights, tokenizer files), or a hub id transformers downloads where the cluster can reach the hub. Its tokenizer tokenizes the text."""
    hf_config: dict[str, Any] | None = None
    """hf: a transformers config (`{model_type: llama, hidden_size: 256, ...}`) to build with fresh weights, instead of name_or_path; `vocab_size` defaults to the tokenizer's."""
    tokenizer: str | None = None
    """hf: a tokenizer folder (or hub id) to use instead of the one in name_or_path; with hf_config, this or data.transforms `{type: tokenize, tokenizer: bpe}`."""
    trust_remote_code: bool = False
    """hf: run the model's own Python code from its folder or the hub (transformers' trust_remote_code); only for models you trust."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """hf: the dtype the weights are loaded in; null: train.precision's (DeepSpeed trains in train.precision either way)."""
    attn_implementation: str | None = None
    """hf: transformers' attention implementation (`sdpa`, `eager`, `flash_attention_2`, ...); null: transformers' default for the model."""
    builder: str | None = None
    """python: `package.module:function`, importable from the working directory (so it travels with `raylaunch submit`); called as function(model section, input shape, number of classes or vocabulary size), it returns the `nn.Module`, whose forward takes a batch of inputs and returns logits ([batch, classes], or [batch, seq, vocab] for text)."""
    loss: str | None = None
    """python: `package.module:function` computing the training loss as function(logits, targets) -> a scalar tensor; null: cross-entropy."""
    lora: Lora | None = None
    """hf with name_or_path: train LoRA adapters (PEFT) instead of every weight (`{}` takes the defaults); only the adapters reach the optimizer and the checkpoints. The export holds the merged model (a plain transformers folder) and the adapter (`adapter/`, PEFT's layout)."""
    options: dict[str, Any] = {}
    """python: your builder's own settings (it reads them as model["options"]); sweeps can search them (`model.options.hidden`)."""
    overrides: dict[str, Any] | None = None
    """distill.student with type hf: the student is the teacher's transformers config with these values changed (`{num_hidden_layers: 2}`), on the teacher's tokenizer; instead of name_or_path or hf_config."""
    init: Literal["auto", "teacher_layers", "fresh"] = "auto"
    """distill.student with overrides: `teacher_layers` starts from the teacher's weights, keeping every k-th of its layers (k = teacher layers // student layers, as DistilBERT did; the overrides may change the depth and settings such as dropout, not widths or heads); `fresh` from new weights; `auto` teacher_layers where the overrides allow it, else fresh."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.type == "gpt" and self.d_model % self.n_head:
            raise ValueError(f"n_head: {self.n_head} must divide d_model {self.d_model}")
        given = [f for f in ("name_or_path", "hf_config", "overrides") if getattr(self, f) is not None]
        if self.type == "hf" and len(given) != 1:
            raise ValueError("name_or_path: model.type hf needs one of name_or_path (a model folder or hub id) and "
                             "hf_config (a transformers config to build with fresh weights)" if len(given) < 2 else
                             f"{given[1]}: model.type hf takes one of name_or_path, hf_config and (a student) overrides; "
                             f"drop {' or '.join(given[1:])}")
        if self.init != "auto" and self.overrides is None:
            raise ValueError("init: only for a student derived from its teacher (distill.student.overrides)")
        if self.hf_config is not None and not isinstance(self.hf_config.get("model_type"), str):
            raise ValueError("hf_config: needs model_type (llama, gpt2, mistral, ...): the transformers architecture to build")
        if self.lora is not None and (self.hf_config is not None or self.overrides is not None):
            raise ValueError("lora: adapters train on pretrained weights; give model.name_or_path instead of hf_config"
                             if self.overrides is None else "lora: a student derived from its teacher trains every weight; drop lora")
        hf_only = [f for f in ("name_or_path", "hf_config", "tokenizer", "lora", "overrides") if getattr(self, f) is not None]
        hf_only += ["task"] if self.task != "auto" else []
        if self.type != "hf" and hf_only:
            raise ValueError(f"{hf_only[0]}: only for model.type hf (got {self.type})")
        if self.type == "python" and self.builder is None:
            raise ValueError("builder: model.type python needs builder: \"package.module:function\" returning the nn.Module")
        python_only = [f for f in ("builder", "loss") if getattr(self, f) is not None] + (["options"] if self.options else [])
        if self.type != "python" and python_only:
            raise ValueError(f"{python_only[0]}: only for model.type python (got {self.type})")
        for field in ("builder", "loss"):
            path = getattr(self, field)
            if path is not None and not IMPORT_PATH.fullmatch(path):
                raise ValueError(f"{field}: {path!r} is not an import path; write it as \"package.module:function\"")
        return self


class ZeroConfig(Section):
    stage: Literal[0, 1, 2, 3, "auto"] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 also gradients, 3 also parameters; `auto` picks the lowest that fits the worker's memory (see `raylaunch plan`)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the optimizer step) in CPU memory: ZeRO-Offload. Stages 1-3."""
    offload_param: bool = False
    """Keep parameters in CPU memory between uses: ZeRO-Infinity's CPU tier. Stage 3 only."""

    @model_validator(mode="after")
    def _offload_fits_stage(self) -> ZeroConfig:
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer: needs stage 1, 2 or 3 (stage 0 keeps no partitioned optimizer to offload)")
        if self.offload_param and self.stage not in (3, "auto"):
            raise ValueError(f"offload_param: needs stage 3, got stage {self.stage}")
        return self


class TrainConfig(Section):
    workers: int | tuple[int, int] = 2
    """Ray Train workers (data-parallel ranks), or [min, max]: as many as the cluster holds in that range, the group shrunk and grown again (from the latest checkpoint) as nodes go and come. The global batch stays micro_batch_size x grad_accum_steps x max: every count in the range must divide max x grad_accum_steps."""
    resize_check_s: float = Field(60.0, gt=0)
    """With a range of workers: how often Ray Train looks for room to grow the group."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; otherwise CPU workers over gloo."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes: PACK fills nodes first (fast collectives), SPREAD puts them on different nodes where it can."""
    epochs: int = Field(10, ge=1)
    """Passes over the train split."""
    micro_batch_size: int = Field(32, ge=1)
    """Rows (sequences for gpt) per worker per forward/backward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro batches accumulated before each optimizer step."""
    global_batch_size: int | None = Field(None, ge=1)
    """Rows per optimizer step over all workers; null derives micro_batch_size x grad_accum_steps x workers, and a given value must equal that."""
    lr: float = Field(2e-3, gt=0)
    """AdamW peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """`cosine`: linear warmup for warmup_steps, then cosine decay to lr x min_lr_ratio at the last step; `constant`: lr throughout."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup (cosine schedule)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr (cosine schedule)."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 and fp16 (with dynamic loss scaling) need GPUs, CPU workers train in fp32."""
    activation_checkpointing: bool = False
    """gpt: recompute each block's activations in the backward pass instead of storing them."""
    zero: ZeroConfig = ZeroConfig()
    """DeepSpeed ZeRO settings."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file to start from (Hugging Face / DeepSpeed example shape); its `"auto"` values are filled from this config, and a value both set differently is an error."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Also checkpoint (and validate) every this many optimizer steps; null: at the end of each epoch only."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept, best first by the validation metric (the latest is always kept too, for resuming)."""
    max_failures: int = Field(0, ge=-1)
    """Times Ray Train restarts the worker group from the latest checkpoint after a worker or node dies; -1 without limit."""
    max_preemption_failures: int = Field(-1, ge=-1)
    """Restarts after a node is preempted (drained with a deadline, as a cloud's spot reclaim is), counted apart from max_failures; -1 without limit."""
    preemption_check_steps: int = Field(10, ge=1)
    """Every this many optimizer steps the workers ask Ray Train whether a node of theirs is being preempted (a call every rank waits on); on a notice they checkpoint at once and wait for the restart. Not on an embedded Ray, which has no preemption."""
    on_nan: Literal["fail", "skip"] = "fail"
    """A non-finite loss: `fail` stops the run naming the step (the last good checkpoint stays), `skip` drops that step's update."""
    seed: int = 0
    """Seed for model initialisation and shuffling."""

    @field_validator("workers", mode="before")
    @classmethod
    def _a_count_or_a_range(cls, workers):
        def whole(n) -> bool:
            return isinstance(n, int) and not isinstance(n, bool)

        pair = isinstance(workers, (list, tuple)) and len(workers) == 2 and all(map(whole, workers))
        low, high = (workers, workers) if whole(workers) else workers if pair else (0, -1)
        if low < 1 or high < low:
            raise ValueError(f"give a count of at least 1, or a range [min, max] with 1 <= min <= max (got {workers!r})")
        return tuple(workers) if pair else workers

    @model_validator(mode="after")
    def _batch_triple_is_consistent(self) -> TrainConfig:
        derived = self.micro_batch_size * self.slots
        if self.global_batch_size is not None and self.global_batch_size != derived:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} must equal micro_batch_size x grad_accum_steps x workers "
                f"= {self.micro_batch_size} x {self.grad_accum_steps} x {self.max_workers} = {derived}"
            )
        low, high = self.worker_range
        uneven = [n for n in range(low, high + 1) if self.slots % n]
        if uneven:
            every = math.lcm(*range(low, high + 1))
            raise ValueError(
                f"workers: [{low}, {high}] may run {uneven[0]} workers, which cannot share a step's {self.slots} micro "
                f"batches ({high} x grad_accum_steps {self.grad_accum_steps}) evenly; set grad_accum_steps to a multiple "
                f"of {every // math.gcd(every, high)}, or choose a range whose every count divides {self.slots}"
            )
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision: {self.precision} needs use_gpu: true (CPU workers train in fp32)")
        return self

    def batch_triple(self) -> tuple[int, int, int]:
        """DeepSpeed's (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps) on
        the most workers (a smaller group accumulates over more micro batches: the same global batch)."""
        return self.micro_batch_size * self.slots, self.micro_batch_size, self.grad_accum_steps

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: the same count twice unless the group is elastic."""
        return (self.workers, self.workers) if isinstance(self.workers, int) else tuple(self.workers)

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] != self.worker_range[1]

    @property
    def slots(self) -> int:
        """Micro batches per optimizer step over all workers: the train split is cut into as many
        streams, and a group of any size accumulates over its share of them."""
        return self.max_workers * self.grad_accum_steps


# What PBT may change between a trial's checkpoint and the trial that continues from it: values that
# leave the model's parameters, the worker count (ZeRO shards), the batch layout and the length of
# the run (the data position and the lr schedule) as they were.
PBT_MUTABLE = ("train.lr", "train.weight_decay", "train.grad_clip", "train.warmup_steps", "train.min_lr_ratio",
               "model.dropout", "distill.lr", "distill.temperature", "distill.alpha")

DOMAIN_KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


class SearchDomain(Section):
    choice: list[Any] | None = None
    """Pick one of these values."""
    uniform: tuple[float, float] | None = None
    """A float drawn uniformly from [low, high]."""
    loguniform: tuple[float, float] | None = None
    """A float drawn log-uniformly from [low, high]."""
    randint: tuple[int, int] | None = None
    """An integer drawn from [low, high)."""
    grid: list[Any] | None = None
    """Every one of these values, each in its own trials (num_samples times over). Under pbt: the starting population's values, and the choices a perturbation moves between."""

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> SearchDomain:
        kinds = [k for k in DOMAIN_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)}")
        for kind in ("choice", "grid"):
            if getattr(self, kind) is not None and not getattr(self, kind):
                raise ValueError(f"{kind} needs at least one value")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, k) is not None)

    def edge_values(self) -> list[Any]:
        """Values that must all pass the schema for every sample to pass it."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice if self.choice is not None else self.grid)
        low, high = self.uniform or self.loguniform or self.randint
        return [low, high - 1] if self.randint is not None else [low, high]


class TuneConfig(Section):
    enabled: bool = False
    """Run a hyperparameter sweep; its best trial becomes the teacher instead of a single train run."""
    num_samples: int = Field(4, ge=1)
    """Trials to sample from the space (random, optuna). With `grid` domains, Ray Tune's rule: each combination of grid values is run num_samples times; `search: grid` runs each combination once."""
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """Validation metric the scheduler and the final pick go by."""
    mode: Literal["max", "min"] | None = None
    """Whether a higher or a lower metric is better; null: max for val_accuracy, min for val_loss."""
    search: Literal["random", "grid", "optuna"] = "random"
    """How trials' values are chosen: `random` samples the space (every `grid` value is still tried); `grid` tries every combination of the `choice`/`grid` values; `optuna` is Optuna's TPE, which learns from finished trials (no `grid` domains)."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting and running trials after this many seconds; the best so far wins. Null: no limit."""
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    """`asha` stops weak trials early at rungs of epochs; `fifo` runs every trial to the end; `pbt` (population based training) runs every trial to the end but, every `perturbation_interval` epochs, restarts the worst trials from a copy of a top trial's DeepSpeed checkpoint with its values perturbed (pbt can search train.lr, train.weight_decay, train.grad_clip, train.warmup_steps, train.min_lr_ratio and model.dropout)."""
    grace_period: int = Field(1, ge=1)
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps the top 1/reduction_factor of trials at each rung."""
    perturbation_interval: float = Field(1.0, gt=0)
    """PBT: epochs between a trial's exploit/explore decisions."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """PBT: the bottom fraction of trials copies the top fraction."""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """PBT: chance that a copied value is drawn afresh from its domain rather than scaled by 0.8 or 1.2 (or moved to a neighbouring choice)."""
    synch: bool = False
    """PBT: wait until every trial reaches each perturbation point and decide for all of them at once, on results from the same epoch. The decisions no longer depend on which trial happens to report first (reproducible, and fairer with few trials), at the cost of pausing every trial at each point and restarting its worker group. False: each trial is judged against the others' latest results when it reports."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; null fits as many whole worker groups as the cluster's CPUs (or GPUs) hold."""
    space: dict[str, SearchDomain] = {}
    """Search space: a dotted config path (`train.lr`, `model.width`) mapped to a domain."""


class DistillConfig(Section):
    enabled: bool = True
    """Distill the teacher into `student`."""
    student: ModelConfig = ModelConfig(width=8)
    """The smaller model; same fields as `model`. A transformers teacher's student is `{type: hf, overrides: {num_hidden_layers: 2}}` (the teacher's config with those values), or a model of its own on the teacher's tokenizer; without one, a plain run of a transformers teacher is not distilled."""
    temperature: float = Field(4.0, gt=0)
    """Softmax temperature T of the soft targets."""
    alpha: float = Field(0.7, ge=0, le=1)
    """Weight of the soft-target loss: alpha * T^2 * KL + (1 - alpha) * CE."""
    epochs: int | None = Field(None, ge=1)
    """Student epochs; null uses train.epochs."""
    lr: float | None = Field(None, gt=0)
    """Student learning rate; null uses train.lr."""
    teacher_outputs: Literal["live", "precompute"] = "live"
    """`live`: every worker holds the frozen teacher and runs it on each batch. `precompute`: the teacher runs once over the train split (Ray Data batch inference, one model load per actor) and its logits are stored in Parquet beside the run, so the student's workers never hold it; needs data without random augmentations."""
    top_k: int = Field(32, ge=1)
    """With `precompute`, a language model's teacher keeps its top_k logits per token (the full vocabulary per token would not fit); the soft-target loss runs over those."""


QuantMethod = Literal["int8_dynamic", "int8_weight_only", "static_int8", "int4_weight_only"]


class QuantizeConfig(Section):
    enabled: bool = True
    """Quantize the final model (the student, or the teacher when there is none) after training."""
    methods: list[QuantMethod] = Field(["int8_dynamic", "static_int8"], min_length=1)
    """torchao methods, one quantized model each: `int8_dynamic` (int8 activations and weights of the linear layers), `int8_weight_only`, `static_int8` (PT2E for the x86 backend: convolutions too, activations calibrated on the validation split), `int4_weight_only` (skipped, with the reason, where torchao cannot run it on the CPU)."""
    calibration_rows: int = Field(512, ge=1)
    """Validation rows static_int8 calibrates its activation ranges on."""
    compile: bool = True
    """static_int8: also compile the quantized program ahead of time with AOTInductor (`model.pt2` beside the weights, machine code for this machine's CPU and torch version; about 10 s a model; it needs a C++ compiler, and without one the model is exported without it, saying why). `load_model`, `raylaunch predict` and the evaluate stage run it where the CPU's vector instructions and torch match, and the reference program (several times slower at small batches) elsewhere."""
    max_drop: float = Field(0.02, ge=0, le=1)
    """Accuracy gate: the most a quantized model may lose against its fp32 source on the test split, as a fraction (0.02 = 2 accuracy points; for a language model, 0.02 = 2% higher perplexity). A model over it fails the stage and is kept, marked rejected."""

    @field_validator("methods")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        repeated = sorted({m for m in value if value.count(m) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice")
        return value


class OutputConfig(Section):
    dir: str = "runs/run"
    """Run directory, a path or a URI pyarrow opens (`s3://bucket/runs/x`, `gs://...`, `file:///...`); it must not exist yet or be empty (or, with `--resume`, hold the run to continue). At a URI, Ray Train and Tune write checkpoints there from every node, and the driver's files (models, summary, reports, metric logs) are copied up after each stage from a staging folder under ~/.cache/raylaunch/staging."""
    tensorboard: bool = True
    """Write every training run's metrics (per step: loss, lr; per report: validation metric, throughput) as TensorBoard event files under `tensorboard/<run>/` in the run directory."""
    mlflow: bool | str = False
    """Also log them to MLflow: `true` keeps an MLflow store in the run directory (`mlflow.db`, SQLite), a string is a tracking URI (`http://mlflow:5000`); one MLflow run per pipeline run, a nested run per training run."""


NOT_PT2E = ("hf",)
"""Model families quantize's static_int8 (a PT2E export of the whole model) does not take: a plain
run skips it with the reason, a config that lists it is refused."""


def student_fits(teacher: ModelConfig, student: ModelConfig) -> bool:
    """A transformers teacher distils into a transformers student (they share its tokenizer)
    and only it does: the default student (a cnn) is no student for it."""
    return (teacher.type == "hf") == (student.type == "hf")


def searches_student(space: dict) -> bool:
    """Whether a search space holds only `distill` paths: its trials distill students rather than
    train teachers."""
    return bool(space) and all(path.startswith("distill.") for path in space)


class RunConfig(Section):
    cluster: ClusterConfig = ClusterConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    distill: DistillConfig = DistillConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _precompute_needs_fixed_inputs(self) -> RunConfig:
        augment = [t.type for t in self.data.transforms if t.type in AUGMENTATIONS]
        if self.distill.enabled and self.distill.teacher_outputs == "precompute" and augment:
            raise ValueError(f"distill.teacher_outputs: precompute stores one teacher output per row, but "
                             f"{', '.join(augment)} in data.transforms changes the rows every epoch; use live")
        if self.model.overrides is not None:
            raise ValueError("model.overrides: only a student derives from its teacher (distill.student.overrides); "
                             "give the model's own name_or_path or hf_config")
        return self

    @property
    def student_fits_teacher(self) -> bool:
        return student_fits(self.model, self.distill.student)

    @property
    def sweeps_student(self) -> bool:
        """A sweep of `distill` paths only: its trials distill the trained teacher into students."""
        return self.tune.enabled and searches_student(self.tune.space)

    def default_stages(self) -> list[str]:
        """The stages a plain `raylaunch run` performs: a sweep replaces the single run it searches
        (the teacher's training, or with only distill paths in its space, the distillation)."""
        distills = self.student_fits_teacher
        if self.sweeps_student:
            stages = ["preprocess", "train", "tune"]
        else:
            stages = ["preprocess", "tune" if self.tune.enabled else "train"]
            stages += ["distill"] if self.distill.enabled and distills else []
        return stages + (["quantize"] if self.quantize.enabled else []) + ["evaluate"]


def metric_mode(metric: str) -> str:
    """Whether a larger value of a validation metric is better ("max") or worse ("min")."""
    return "max" if metric == "val_accuracy" else "min"
