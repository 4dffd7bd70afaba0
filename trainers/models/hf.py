"""Hugging Face transformers models: loaded from a folder (or the hub), or built from a config; a
causal LM or a sequence classifier (`model.task`).

`CausalLM` and `SequenceClassifier` wrap one as raylaunch's own models are (token ids in, logits
out), so the train loop, evaluation and prediction treat it as they treat the built-in ones. What
a run exports is a transformers folder (`save_hf`) that `AutoModelForCausalLM` (or
`AutoModelForSequenceClassification`) `.from_pretrained` loads as it is.
"""

from __future__ import annotations

import copy
import inspect
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
WIDTHS = ("hidden_size", "n_embd", "d_model")
"""A transformers config's names for the model's width."""
MAX_SHARD_SIZE = "5GB"  # transformers' own default: larger exports are written as indexed shards


class CausalLM(nn.Module):
    """A transformers causal LM: `forward(tokens)` returns next-token logits [batch, seq, vocab];
    `positions` (packed examples: restarting at each) are its position ids."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=tokens, position_ids=positions, use_cache=False).logits

    @property
    def activation_checkpointing(self) -> bool:
        return self.hf.is_gradient_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        # The model's own checkpointing (per decoder layer), non-reentrant as the gpt's.
        if on:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.hf.is_gradient_checkpointing:
            self.hf.gradient_checkpointing_disable()


class SequenceClassifier(CausalLM):
    """A transformers sequence classifier: `forward(tokens)` returns class logits [batch, classes].
    Rows are right-padded with the tokenizer's pad token, which the attention mask leaves out (a
    decoder model classifies by its last token before the padding, found the same way)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.long()
        return self.hf(input_ids=tokens, attention_mask=(tokens != self.hf.config.pad_token_id).long()).logits


WRAPPERS = {"causal_lm": CausalLM, "sequence_classification": SequenceClassifier}
DATA_TASKS = {"lm": "causal_lm", "classify": "sequence_classification"}
"""The model task that a dataset's task (`DataMeta.task`) trains."""


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}[task]


def hf_config(model: dict, vocab_size: int, classes: list | None = None):
    """The transformers config of the `model` section: the folder's (or hub id's) config.json, or
    `model.hf_config` with the tokenizer's vocabulary size unless it gives one. A classifier's
    (`classes`) gets its labels; the tokenizer's special tokens (`model["special_tokens"]`, set by
    the train loop) fill those the config lacks."""
    from transformers import AutoConfig

    if model.get("hf_config") is not None:
        values = dict(model["hf_config"])
        if vocab_size:
            values.setdefault("vocab_size", vocab_size)
        # The architecture's default special tokens (GPT-2's 50256) mean nothing in this tokenizer:
        # the export writes the tokenizer's own (save_hf).
        for name in SPECIAL_TOKEN_IDS:
            values.setdefault(name, None)
        try:
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        except ValueError as exc:  # an unknown model_type
            raise ValueError(f"model.hf_config: {str(exc).splitlines()[0]}") from None
    else:
        config = AutoConfig.from_pretrained(model["name_or_path"], trust_remote_code=model.get("trust_remote_code", False))
    for name, value in (model.get("special_tokens") or {}).items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    if classes is not None:
        config.num_labels = len(classes)
        config.id2label = {i: str(c) for i, c in enumerate(classes)}
        config.label2id = {str(c): i for i, c in enumerate(classes)}
    if getattr(config, "vocab_size", None) is not None and config.vocab_size < vocab_size:
        where = "model.hf_config.vocab_size" if model.get("hf_config") is not None else f"model.name_or_path ({model['name_or_path']})"
        raise ValueError(f"{where}: {config.vocab_size} embeddings but the tokenizer has {vocab_size} tokens; "
                         f"use a tokenizer made for this model, or a larger vocab_size")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and model["seq_len"] > positions:
        raise ValueError(f"model.seq_len: {model['seq_len']} tokens but the model has {positions} positions "
                         f"(max_position_embeddings); use a shorter seq_len")
    return config


def build_hf(model: dict, input_shape: list[int], num_classes: int, weights: bool = True) -> CausalLM:
    """The `hf` model for `model["task"]`: a causal LM over a `num_classes` vocabulary, or a
    classifier of `num_classes` classes (`model["classes"]`, their names, where known); sequences of
    `model.seq_len` tokens. The folder's weights (`weights`; a classifier's head is new unless the
    folder holds one), or fresh ones for hf_config or when only the architecture is needed (the
    plan builds it on the meta device)."""
    task = model.get("task") or "causal_lm"
    if task == "auto":
        raise ValueError("build_hf: resolve model.task from the data first (trainers.models.hf.DATA_TASKS)")
    if input_shape[-1] != model["seq_len"]:
        raise ValueError(f"hf: model.seq_len {model['seq_len']} but the data was packed into blocks of {input_shape[-1]}")
    classes, vocab_size = None, num_classes
    if task == "sequence_classification":  # the vocabulary is the tokenizer's (`model["vocab_size"]`, where known)
        classes, vocab_size = model.get("classes") or list(range(num_classes)), model.get("vocab_size") or 0
    config = hf_config(model, vocab_size, classes)
    options = {"trust_remote_code": model.get("trust_remote_code", False),
               "dtype": DTYPES[model.get("dtype") or "float32"]}
    if model.get("attn_implementation"):
        options["attn_implementation"] = model["attn_implementation"]
    auto = auto_class(task)
    if model.get("name_or_path") and weights:
        # transformers 5 swaps layers for kernels fetched from the hub by default (use_kernels):
        # a download at run time, and code nobody reviewed. Never here (../shared/FACTS.md). A
        # classifier folder whose head has another number of labels than the data's classes gets
        # a new head, the rest of its weights kept: fine-tuning on other labels.
        hf = auto.from_pretrained(model["name_or_path"], config=config, use_kernels=False,
                                  ignore_mismatched_sizes=task == "sequence_classification", **options)
    else:
        hf = auto.from_config(config, **options)
    hf.config.use_cache = False  # training and scoring whole sequences: no key/value cache
    if model.get("lora"):
        hf = with_lora(hf, model["lora"], task)
    return WRAPPERS[task](hf)


def generation_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside `model` that generates with its own `generate`, or None (not
    a transformers model, or one of its own code that is no GenerationMixin)."""
    hf = getattr(model, "hf", None)
    return hf if hasattr(hf, "generate") else None


def with_lora(hf: nn.Module, lora: dict, task: str) -> nn.Module:
    """`hf` with LoRA adapters (PEFT) on `lora["target_modules"]`: only they train (and a
    classifier's head, which PEFT keeps whole: it is new)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"],
                        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS)
    return get_peft_model(hf, config)


ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def save_adapter(directory: Path, peft_model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Write a LoRA model's adapter in PEFT's layout (`PeftModel.from_pretrained` loads it) from
    `state_dict`, the wrapper's trainable tensors (keys under `hf.`, gathered under ZeRO-3)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(peft_model, {k.removeprefix("hf."): v for k, v in state_dict.items()},
                                        save_embedding_layers=False)  # "auto" may ask the hub about the base
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(directory))
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def merged_with_adapter(model: dict, adapter_dir: Path, task: str, classes: list | None = None) -> nn.Module:
    """The base model (`model["name_or_path"]`, in fp32) with the adapter in `adapter_dir` merged
    into its weights: a plain transformers model, in eval mode (a classifier's: of `classes`)."""
    from peft import PeftModel

    section = {**model, "lora": None, "task": task, "dtype": "float32", "classes": classes}
    base = build_hf(section, [model["seq_len"]], len(classes or [])).hf
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def separates_packed(model: dict) -> bool:
    """Whether the model keeps packed examples apart when their position ids restart at each: a
    transformers model whose forward takes position ids and builds its masks with transformers'
    create_causal_mask, which reads such positions as separate sequences (sdpa, eager, flex; flash
    attention reads them too). A model of its own code is not assumed to."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if model.get("trust_remote_code"):
        return False
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config(model, 0))]
    except KeyError:
        return False
    if "position_ids" not in inspect.signature(cls.forward).parameters:
        return False
    return "create_causal_mask" in inspect.getsource(sys.modules[cls.__module__])


def hidden_size(model: dict) -> int:
    """The model's width (DeepSpeed sizes its ZeRO-3 buckets by it), read from its config alone."""
    if model.get("hf_config") is not None:
        width = next((model["hf_config"][name] for name in WIDTHS if model["hf_config"].get(name)), None)
        if width:
            return int(width)
    config = hf_config(model, 0)
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024)


def save_hf(directory: Path, state_dict: dict[str, torch.Tensor], config, special_tokens: dict[str, int],
            code: list[Path] = ()) -> list[str]:
    """Write a transformers folder: config.json and generation_config.json (with the tokenizer's
    special token ids) and the weights as safetensors, sharded above MAX_SHARD_SIZE; `code` (a
    trust_remote_code model's Python files, `remote_code_files`) is copied beside them and
    config.json's auto_map made to name those copies. Returns the files written. `state_dict` is
    `CausalLM`'s (keys under `hf.`), tied weights listed once."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    config = copy.deepcopy(config)
    for name, value in special_tokens.items():
        setattr(config, name, value)
    config.use_cache = True  # the exported model is for inference
    if code and getattr(config, "auto_map", None):
        config.auto_map = {key: local_class_ref(ref) for key, ref in config.auto_map.items()}
    before = set(p.name for p in directory.iterdir())
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    weights = {key.removeprefix("hf."): value for key, value in state_dict.items()}
    save_torch_state_dict(weights, directory, max_shard_size=MAX_SHARD_SIZE)
    for path in code:
        shutil.copyfile(path, directory / path.name)
    return sorted(p.name for p in directory.iterdir() if p.name not in before)


def remote_code_files(hf: nn.Module) -> list[Path]:
    """The Python files that define a trust_remote_code model: the modules of its model and config
    classes and what they import relatively, as transformers loaded them (from a folder or a hub
    repo); none for a model of transformers' own."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files: dict[str, Path] = {}
    for cls in (type(hf), type(hf.config)):
        if cls.__module__.split(".")[0] != "transformers_modules":
            continue
        source = Path(sys.modules[cls.__module__].__file__)
        # transformers caches each class's module under its own hash: the same file can come twice
        for path in (source, *map(Path, get_relative_import_files(source))):
            files.setdefault(path.name, path)
    return [files[name] for name in sorted(files)]


def local_class_ref(ref):
    """An auto_map entry made to point at code beside config.json: `repo--module.Class` (code kept
    in another hub repo) becomes `module.Class`; tokenizer entries are pairs."""
    if isinstance(ref, (list, tuple)):
        return [local_class_ref(part) for part in ref]
    return ref.split("--")[-1] if isinstance(ref, str) else ref


def load_hf(directory: Path | str, task: str = "causal_lm", trust_remote_code: bool = False,
            dtype: torch.dtype = torch.float32) -> CausalLM:
    """An exported transformers folder, loaded by transformers itself, in eval mode (a model of
    its own code, `trust_remote_code`, runs the Python files exported with it)."""
    hf = auto_class(task).from_pretrained(str(directory), dtype=dtype, use_kernels=False,
                                          trust_remote_code=trust_remote_code)
    return WRAPPERS[task](hf).eval()
