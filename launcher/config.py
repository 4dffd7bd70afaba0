"""The run configuration: one YAML file, validated by these models before Ray starts.

The pydantic models are the single source of truth: the README's config reference is
generated from them (`raylaunch config reference`), and every check a config needs happens
here, raising `ConfigError` with one `dotted.path: problem` line per mistake.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.remote import is_empty_dir, is_uri, join, read_text
from dataprep import AUGMENTATIONS
from launcher.rundir import resume_problems

SKLEARN_DATASETS = ("sklearn:digits", "sklearn:breast_cancer", "sklearn:wine", "sklearn:iris")
STAGES = ("preprocess", "train", "tune", "distill", "quantize", "evaluate")
TUNABLE_SECTIONS = ("model", "train", "distill")


class ConfigError(Exception):
    """A config, override or input problem; each entry of `problems` is one `path: message` line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


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


class DataConfig(Section):
    source: str | list[str] = "sklearn:digits"
    """Where the data is: `sklearn:digits` / `sklearn:breast_cancer` / `sklearn:wine` / `sklearn:iris`, or one or more files, folders or globs, local or a URI pyarrow knows (`s3://`, `gs://`, `file://`); for text, `python-stdlib` is this Python's own library sources."""
    format: Literal["auto", "parquet", "csv", "jsonl", "text", "images"] = "auto"
    """`auto` goes by the file extensions. `images`: a folder with one subfolder per class (the label is the subfolder's name). `text`: files read as text for the language model."""
    text_glob: str = "**/*"
    """text and images: which files under a source folder to read (a glob, `**` recursive)."""
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
    """Read the train and val splits once into Ray's object store before training, instead of reading their cached files again every epoch: each epoch then starts without waiting for read tasks, which counts most when epochs are short, and each rank reads its own shard instead of a streaming split, once, into its own memory (so the splits take their size there too). `auto`: when the two splits, and the copy of them each training run at once cuts into its ranks' shards, take at most 1/4 of the cluster's object store memory: splits up to 1/8 of it for one run, 1/16 for a sweep of 3 trials at once (and no more than data.ingest_memory_mb where set). summary.json records which (`data_in_memory`, per training stage); a `--resume` whose `auto` would choose otherwise is refused, saying the value that continues it exactly."""

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
        text = self.format == "text"
        wrong = [k for k in kinds if (k in TEXT_TRANSFORMS) != text or (text and k == "label_encode")]
        if wrong:
            kind = "text (data.format: text)" if text else "tables and images"
            raise ValueError(f"transforms: {', '.join(wrong)} cannot apply to {kind}")
        if text and kinds and kinds != ["tokenize", "pack"]:
            raise ValueError("transforms: text takes [tokenize, pack], in that order")
        return self



class ModelConfig(Section):
    type: Literal["cnn", "mlp", "gpt"] = "cnn"
    """Model family: `cnn` for images, `mlp` for tabular rows, `gpt` (decoder-only transformer) for text."""
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
    """gpt: tokens per training sequence (the text is packed into blocks of this length)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.type == "gpt" and self.d_model % self.n_head:
            raise ValueError(f"n_head: {self.n_head} must divide d_model {self.d_model}")
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
    workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
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
    on_nan: Literal["fail", "skip"] = "fail"
    """A non-finite loss: `fail` stops the run naming the step (the last good checkpoint stays), `skip` drops that step's update."""
    seed: int = 0
    """Seed for model initialisation and shuffling."""

    @model_validator(mode="after")
    def _batch_triple_is_consistent(self) -> TrainConfig:
        derived = self.micro_batch_size * self.grad_accum_steps * self.workers
        if self.global_batch_size is not None and self.global_batch_size != derived:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} must equal micro_batch_size x grad_accum_steps x workers "
                f"= {self.micro_batch_size} x {self.grad_accum_steps} x {self.workers} = {derived}"
            )
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision: {self.precision} needs use_gpu: true (CPU workers train in fp32)")
        return self

    def batch_triple(self) -> tuple[int, int, int]:
        """DeepSpeed's (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)."""
        return self.micro_batch_size * self.grad_accum_steps * self.workers, self.micro_batch_size, self.grad_accum_steps


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
    """The smaller model; same fields as `model`."""
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
        return self

    @property
    def sweeps_student(self) -> bool:
        """A sweep of `distill` paths only: its trials distill the trained teacher into students."""
        return self.tune.enabled and searches_student(self.tune.space)

    def default_stages(self) -> list[str]:
        """The stages a plain `raylaunch run` performs: a sweep replaces the single run it searches
        (the teacher's training, or with only distill paths in its space, the distillation)."""
        if self.sweeps_student:
            stages = ["preprocess", "train", "tune"]
        else:
            stages = ["preprocess", "tune" if self.tune.enabled else "train"]
            stages += ["distill"] if self.distill.enabled else []
        return stages + (["quantize"] if self.quantize.enabled else []) + ["evaluate"]


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _format_error(error: dict) -> str:
    path = _loc_path(error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "union_tag_invalid":
        message = f"unknown type {error['ctx']['tag']!r} (known: {error['ctx']['expected_tags']})"
    elif kind == "union_tag_not_found":
        message = "needs a type (a name, or a mapping with `type:`)"
    elif kind == "value_error":
        # Cross-field validators name the field they blame as "field: message".
        message = message.removeprefix("Value error, ")
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            path, message = f"{path}.{field}" if path else field, rest
    elif message.startswith("Input should be"):
        message = "must be" + message.removeprefix("Input should be")
    if kind not in ("extra_forbidden", "missing", "value_error") and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}" if path else message


def _loc_path(loc: tuple) -> str:
    """`data.transforms[0].size` from pydantic's ('data', 'transforms', 0, 'resize', 'size'): list
    indices in brackets, the tag pydantic adds after a discriminated union's index left out."""
    path, after_index = "", False
    for part in loc:
        if isinstance(part, int):
            path, after_index = f"{path}[{part}]", True
            continue
        if not str(part).startswith("function-after") and not (after_index and part in TRANSFORM_TYPES):
            key = _shown_key(part)
            path = f"{path}.{key}" if path else key
        after_index = False
    return path


def _shown_path(parts: list[str]) -> str:
    return ".".join(_shown_key(p) for p in parts)


def _shown_key(key) -> str:
    """A key as a problem line shows it: quoted when it is empty or has spaces or control characters
    (a key `\r` would otherwise print as nothing at all)."""
    text = str(key)
    return text if re.fullmatch(r"[^\s'\"]+", text) and text.isprintable() else repr(text)


def _unknown_key_hint(path: str) -> str:
    """Name the keys that are allowed where an unknown one was found."""
    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def validate(raw: dict) -> RunConfig:
    """Validate a raw config mapping; raise ConfigError with every problem found. The layers that
    stand apart (the schema, the user's DeepSpeed JSON, the search space) are each checked as far
    as they can be, so that fixing one never uncovers problems the others already had."""
    cfg, problems = _schema(raw)
    # The DeepSpeed JSON first: a file it cannot read is one problem, not one per searched value.
    resolved, more = _apply_deepspeed_json(cfg, raw)
    problems += more
    problems += _search_space_problems(cfg, raw, problems)
    if problems:
        raise ConfigError(problems)
    return resolved


def _schema(raw: dict) -> tuple[RunConfig | None, list[str]]:
    """The config the schema makes of `raw`, or None and its problems."""
    try:
        return RunConfig.model_validate(raw), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            line = _format_error(error)
            if error["type"] == "extra_forbidden":
                line += _unknown_key_hint(".".join(str(p) for p in error["loc"]))
            problems.append(line)
        return None, problems


def _section(raw: dict, name: str) -> BaseModel | None:
    """One top-level section validated alone (None where it has problems of its own): what the
    checks of the other layers can still go by when another section is wrong."""
    value = raw.get(name)
    annotation = RunConfig.model_fields[name].annotation
    try:
        return annotation.model_validate({} if value is None else value)
    except ValidationError:
        return None


def _apply_deepspeed_json(cfg: RunConfig | None, raw: dict) -> tuple[RunConfig | None, list[str]]:
    """Bring a user's DeepSpeed JSON and the `train` section into agreement: the file's concrete
    values decide the fields the YAML left at their defaults; a field both set differently is an
    error naming both. With a config the schema refused (`cfg` None), the file is still read."""
    from trainers.deepspeed_config import DeepSpeedConfigError, read_user_config, reconcile

    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    path = cfg.train.deepspeed_config if cfg is not None else train_raw.get("deepspeed_config")
    if not isinstance(path, str):
        return cfg, []
    try:
        user = read_user_config(path)
    except DeepSpeedConfigError as exc:
        return None, exc.problems
    train = cfg.train if cfg is not None else _section(raw, "train")
    if train is None:
        return None, []
    zero_raw = train_raw.get("zero") if isinstance(train_raw.get("zero"), dict) else {}
    explicit = {f"train.{k}" for k in train_raw} | {f"train.zero.{k}" for k in zero_raw}
    updates, problems = reconcile(user, train.model_dump(mode="json"), explicit, source=path)
    if problems or cfg is None:
        return None, problems
    if not updates:
        return cfg, []
    resolved = copy.deepcopy(raw)
    for field, value in updates.items():
        set_path(resolved, field, list(value) if isinstance(value, tuple) else value)
    return validate(resolved), []  # the updated fields now agree with the file: no further updates


def metric_mode(metric: str) -> str:
    """Whether a larger value of a validation metric is better ("max") or worse ("min")."""
    return "max" if metric == "val_accuracy" else "min"


def _search_space_problems(cfg: RunConfig | None, raw: dict, known: list[str]) -> list[str]:
    """The search space's problems. A searched value is blamed only for the problems it adds to
    those the config already has (`known`); with a config the schema refused (`cfg` None), the
    rest is checked against the sections that stand alone."""
    tune = cfg.tune if cfg is not None else _section(raw, "tune")
    if tune is None:
        return []
    distill = cfg.distill if cfg is not None else _section(raw, "distill")
    base = set(known)
    problems = []
    for path, domain in tune.space.items():
        where = f"tune.space.{path}"
        if tune.search == "grid" and domain.kind not in ("choice", "grid"):
            problems.append(f"{where}: tune.search grid tries every value, so it needs choice or grid (got {domain.kind})")
        if tune.search == "optuna" and domain.kind == "grid":
            problems.append(f"{where}: Optuna samples each value itself; use choice instead of grid with tune.search optuna")
        if tune.scheduler == "pbt" and path not in PBT_MUTABLE:
            problems.append(f"{where}: pbt continues trials from other trials' checkpoints, so it can only change "
                            f"{', '.join(PBT_MUTABLE)}; search {path} with scheduler asha or fifo")
        if path.split(".")[0] not in TUNABLE_SECTIONS:
            problems.append(f"{where}: only paths under {', '.join(TUNABLE_SECTIONS)} can be searched")
            continue
        for value in domain.edge_values():
            try:
                validate(set_path(copy.deepcopy(raw), path, value) | {"tune": {}})
            except ConfigError as exc:
                added = [p for p in exc.problems if p not in base]
                problems += [f"{where}: value {value!r} is rejected: {p}" for p in added]
                if added:
                    break
    if tune.scheduler == "pbt" and tune.search != "random":
        problems.append(f"tune.search: pbt chooses its own values (it copies and perturbs the best trials'), so it "
                        f"needs search random (got {tune.search})")
    natural = metric_mode(tune.metric)
    if tune.mode is not None and tune.mode != natural:
        problems.append(f"tune.mode: {tune.metric} is better when {'higher' if natural == 'max' else 'lower'}, so mode "
                        f"{tune.mode} would pick the worst trial; use {natural} or leave it out")
    if tune.enabled and not tune.space:
        problems.append("tune.space: empty; add at least one path to search, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
    student = sorted(p for p in tune.space if p.startswith("distill."))
    if student and not searches_student(tune.space):
        teacher = sorted(p for p in tune.space if not p.startswith("distill."))
        problems.append(f"tune.space: {', '.join(student)} search the student and {', '.join(teacher)} the teacher; a sweep "
                        f"trains one of them: search distill paths alone (the sweep distills the trained teacher) or none")
    elif student and distill is not None and not distill.enabled:
        problems.append(f"tune.space: {', '.join(student)} are searched by distilling students, but distill.enabled is false")
    return problems


def set_path(raw: dict, path: str, value: Any) -> dict:
    """Set a dotted path in a raw config mapping, following the schema (the rest of a path
    below a mapping-valued field such as `tune.space` is that mapping's key). Returns `raw`."""
    parts = path.split(".")
    model: type[BaseModel] | None = RunConfig
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        field = model.model_fields.get(part) if model else None
        if model is not None and field is None:
            raise ConfigError([f"{_shown_path(parts[: i + 1])}: unknown key{_unknown_key_hint('.'.join(parts[: i + 1]))}"])
        annotation = field.annotation if field else None
        if last:
            node[part] = value
            return raw
        if node.get(part) is None:
            node[part] = {}
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if not section and not str(annotation).startswith("dict["):
            raise ConfigError([f"{_shown_path(parts[: i + 2])}: unknown key ({_shown_path(parts[: i + 1])} is not a section)"])
        if not isinstance(node[part], dict):  # a section, or a mapping-valued field such as tune.space
            raise ConfigError([f"{_shown_path(parts[: i + 1])}: must be a mapping"])
        if not section:
            node[part][".".join(parts[i + 1 :])] = value
            return raw
        node, model = node[part], annotation
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.path=value`; the value is read as YAML so `3`, `1e-3`, `true`, `[1, 8, 8]` get their types."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        shown = text if text.isprintable() and text.strip() == text and text else repr(text)
        raise ConfigError([f"--set {shown}: expected dotted.path=value"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path.strip(), parsed


def load_raw(config_path: str | os.PathLike) -> dict:
    """A YAML config file as a mapping; a file that is not one, or that gives a key twice, is refused."""
    raw, problems = _read_yaml(config_path)
    if problems:
        raise ConfigError(problems)
    return raw


def _read_yaml(config_path: str | os.PathLike) -> tuple[dict, list[str]]:
    """The mapping and the keys it gives twice (problems found alongside the others), or ConfigError
    for a file that is no config at all."""
    path = Path(config_path)
    if path.is_dir():
        raise ConfigError([f"{path}: a folder, not a config file; give the YAML file (e.g. configs/quickstart.yaml)"])
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever PyYAML says
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (cluster, data, model, ...)"])
    return raw, duplicate_keys(text, str(path))


def duplicate_keys(text: str, source: str) -> list[str]:
    """A problem line for each key given twice in one mapping: YAML keeps the last one silently, so
    `lr:` set twice would train with whichever came last."""
    problems: list[str] = []

    def walk(node: yaml.Node, where: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                path = f"{where}.{name}" if where and name is not None else (name or where)
                if name is not None and name != "<<":  # `<<` merges another mapping in; it may recur
                    if name in seen:
                        first, second = seen[name] + 1, key.start_mark.line + 1
                        lines = f"lines {first} and {second}" if first != second else f"both on line {first}"
                        problems.append(f"{source}: {path} is given twice ({lines}); YAML would keep only the second, "
                                        f"so remove one")
                    seen.setdefault(name, key.start_mark.line)
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{where}[{i}]")

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return problems


def load(config_path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `--set` overrides, validate: ConfigError with every problem."""
    cfg, _, problems = _load(config_path, overrides)
    if problems:
        raise ConfigError(problems)
    return cfg


def _load(config_path: str | os.PathLike, overrides: list[str]) -> tuple[RunConfig | None, dict, list[str]]:
    """The config (None where it has problems), the raw mapping after the overrides, and the
    problems; ConfigError only for a file that is no config at all."""
    raw, problems = _read_yaml(config_path)
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_path(raw, path, value)
        except ConfigError as exc:
            problems += exc.problems
    try:
        cfg = validate(raw)
    except ConfigError as exc:
        cfg, problems = None, problems + exc.problems
    return (None if problems else cfg), raw, problems


def load_for_run(config_path: str | os.PathLike, overrides: list[str], stages: list[str] | None,
                 resume: bool = False) -> tuple[RunConfig, list[str]]:
    """What `raylaunch run` starts from: the validated config and the stages to run (`stages`, or
    the config's default), after every check that needs no cluster: the config's own, then the
    files, stages and run directory it names. Every problem of every layer is reported at once;
    the checks against the world go by the sections that are valid where another one is not."""
    cfg, raw, problems = _load(config_path, overrides)
    if stages is None and cfg is not None:
        stages = cfg.default_stages()
    problems += input_problems(cfg, raw, stages or [], resume)
    if problems:
        raise ConfigError(problems)
    return cfg, stages


def check_inputs(cfg: RunConfig, stages: list[str], resume: bool = False) -> None:
    """Checks against the world outside the config (files, run directory), still before Ray starts.
    With `resume`, the run directory must hold a run of this same config."""
    problems = input_problems(cfg, cfg.model_dump(mode="json"), stages, resume)
    if problems:
        raise ConfigError(problems)


def input_problems(cfg: RunConfig | None, raw: dict, stages: list[str], resume: bool = False) -> list[str]:
    """The files, stages and run directory a config names, checked as far as its valid sections go
    (`cfg` None: a config with problems of its own, whose sections are taken one by one from `raw`)."""
    def section(name: str):
        return getattr(cfg, name) if cfg is not None else _section(raw, name)

    data, model, tune, output = section("data"), section("model"), section("tune"), section("output")
    problems = _data_problems(data, model) if data is not None else []
    problems += stage_problems(stages, tune is not None and tune.enabled and searches_student(tune.space))
    if output is None:
        return problems
    out = output.dir
    problems += output_dir_problems(out)
    if isinstance(output.mlflow, str):
        problems += _mlflow_problems(output.mlflow)
    if not any(p.startswith("output.dir") for p in problems):
        if resume:
            problems += _resume_problems(cfg, out)
        elif not is_empty_dir(out):
            problems.append(
                f"output.dir: {out} already exists and is not empty; a run never overwrites another "
                f"(choose a new one with --set output.dir=..., or continue it with --resume)"
            )
    return problems


def output_dir_problems(out: str) -> list[str]:
    """An output.dir URI whose filesystem pyarrow cannot open (an unknown scheme, missing
    credentials or a bucket that is not there)."""
    if not is_uri(out):
        return []
    from cluster.remote import filesystem

    try:
        fs, path = filesystem(out)
        fs.get_file_info(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ValueError by scheme
        reason = " ".join(str(exc).split())[:300]
        return [f"output.dir: cannot open {out} ({reason}); use a URI pyarrow knows (s3://, gs://, hdfs://, file://) "
                f"with its credentials in the environment, or a path"]
    return []


def _mlflow_problems(uri: str) -> list[str]:
    """An MLflow tracking server that does not answer: said now, not after MLflow's minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return []
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
        return [f"output.mlflow: no MLflow tracking server answers at {uri} ({reason}); start it, fix the URI, or set "
                f"output.mlflow: true for a store in the run directory"]
    return []


def _data_problems(data: DataConfig, model: ModelConfig | None) -> list[str]:
    """The data section against the files it names: they exist, and the model fits the data's kind."""
    from dataprep import DataError
    from dataprep.sources import data_files, sources_of

    problems = []
    text = data.format == "text"
    if model is not None and (model.type == "gpt") != text:
        problems.append("model.type: gpt trains on text (data.format: text) and text needs model.type: gpt"
                        f"; got model.type {model.type} with data.format {data.format}")
    sources = sources_of(data.model_dump(mode="json"))
    bundled = [s for s in sources if s.startswith("sklearn:")]
    if bundled and (len(sources) > 1 or text):
        problems.append(f"data.source: a bundled dataset ({bundled[0]}) is read alone, not with other sources or as text")
    elif bundled and bundled[0] not in SKLEARN_DATASETS:
        problems.append(f"data.source: unknown bundled dataset {bundled[0]!r} (known: {', '.join(SKLEARN_DATASETS)})")
    elif not bundled:
        try:
            data_files(data.model_dump(mode="json"))
        except DataError as exc:
            problems += exc.problems
    image_input = data.format == "images" or data.image_shape is not None or data.source == "sklearn:digits"
    if model is not None and model.type == "cnn" and not image_input:
        problems.append("model.type: cnn needs image input; set data.image_shape [channels, height, width], "
                        "use data.format images, or use model.type: mlp")
    return problems


def _resume_problems(cfg: RunConfig | None, out: str) -> list[str]:
    saved = join(out, "config.yaml")  # a path or a URI
    text = read_text(saved)
    if text is None:
        return [f"--resume: {out} holds no run to resume (no config.yaml); run without --resume to start one"]
    problems = resume_problems(out)
    if problems or cfg is None:
        return problems
    before = yaml.safe_load(text) or {}
    now = redacted(cfg.model_dump(mode="json"))  # as config.yaml keeps it
    # data.in_memory says how, not what, to read; the pipeline refuses a resume that would read
    # the interrupted stage's splits otherwise than it did.
    differences = [d for d in _differences(before, now) if d[0] != "data.in_memory"]
    return [f"--resume: {path} was {old!r} in {saved} but is {new!r} now; a resumed run keeps its config"
            for path, old, new in differences]


def _differences(before: Any, now: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in sorted(set(before) | set(now), key=str)
                for d in _differences(before.get(key), now.get(key), f"{path}.{key}" if path else str(key))]
    return [] if before == now else [(path, before, now)]


def stage_problems(stages: list[str], sweeps_student: bool = False) -> list[str]:
    """What is wrong with a `--stages` list: names that are no stage, and an order that cannot run."""
    problems = [f"--stages: unknown stage {name!r} (stages: {', '.join(STAGES)})" for name in stages if name not in STAGES]
    return problems + _stage_order_problems([s for s in stages if s in STAGES], sweeps_student)


def _stage_order_problems(stages: list[str], sweeps_student: bool = False) -> list[str]:
    needs = {
        "train": ("preprocess",),
        "tune": ("train",) if sweeps_student else ("preprocess",),
        "distill": ("train", "tune"),
        "quantize": ("distill", "train", "tune"),
        "evaluate": ("train", "tune"),
    }
    problems = []
    if sweeps_student and "distill" in stages:
        problems.append("--stages: tune.space searches distill paths, so the tune stage distills the student; leave "
                        "distill out")
    if stages and stages[0] != "preprocess":
        problems.append("--stages: must start with preprocess (continuing an existing run directory is not supported yet)")
    for i, stage in enumerate(stages):
        if stage in stages[:i]:
            problems.append(f"--stages: {stage} is listed twice")
        earlier = stages[:i]
        if stage in needs and not any(n in earlier for n in needs[stage]):
            problems.append(f"--stages: {stage} needs {' or '.join(needs[stage])} before it")
    if [s for s in STAGES if s in stages] != stages:
        problems.append(f"--stages: stages run in the order {', '.join(STAGES)}")
    return problems


REDACTED = "***"


def redacted(dump: dict) -> dict:
    """A config dump with the values of `cluster.job.env_vars` (tokens, passwords) replaced by
    REDACTED: what goes anywhere but the job's own environment (config.yaml, MLflow, Tune's
    experiment state, the workers)."""
    env_vars = ((dump.get("cluster") or {}).get("job") or {}).get("env_vars")
    if not env_vars:
        return dump
    dump = copy.deepcopy(dump)
    dump["cluster"]["job"]["env_vars"] = dict.fromkeys(env_vars, REDACTED)
    return dump


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML, secrets redacted."""
    return yaml.safe_dump(redacted(cfg.model_dump(mode="json")), sort_keys=False)
