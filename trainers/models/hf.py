"""Hugging Face transformers causal LMs: loaded from a folder (or the hub), or built from a config.

`CausalLM` wraps one as raylaunch's own models are (token ids in, next-token logits out), so the
train loop, evaluation and prediction treat it as they treat the built-in gpt. What a run exports
is a transformers folder (`save_hf`) that `AutoModelForCausalLM.from_pretrained` loads as it is.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_SHARD_SIZE = "5GB"  # transformers' own default: larger exports are written as indexed shards


class CausalLM(nn.Module):
    """A transformers causal LM: `forward(tokens)` returns next-token logits [batch, seq, vocab]."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits

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


def hf_config(model: dict, vocab_size: int):
    """The transformers config of the `model` section: the folder's (or hub id's) config.json, or
    `model.hf_config` with the tokenizer's vocabulary size unless it gives one."""
    from transformers import AutoConfig

    if model.get("hf_config") is not None:
        values = dict(model["hf_config"])
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
    """The `hf` model for text packed into blocks of `model.seq_len` over a `num_classes` vocabulary:
    the folder's weights (`weights`), or fresh ones for hf_config or when only the architecture is
    needed (the plan builds it on the meta device)."""
    from transformers import AutoModelForCausalLM

    if input_shape[-1] != model["seq_len"]:
        raise ValueError(f"hf: model.seq_len {model['seq_len']} but the data was packed into blocks of {input_shape[-1]}")
    config = hf_config(model, num_classes)
    options = {"trust_remote_code": model.get("trust_remote_code", False),
               "dtype": DTYPES[model.get("dtype") or "float32"]}
    if model.get("attn_implementation"):
        options["attn_implementation"] = model["attn_implementation"]
    if model.get("name_or_path") and weights:
        # transformers 5 swaps layers for kernels fetched from the hub by default (use_kernels):
        # a download at run time, and code nobody reviewed. Never here (../shared/FACTS.md).
        hf = AutoModelForCausalLM.from_pretrained(model["name_or_path"], config=config, use_kernels=False, **options)
    else:
        hf = AutoModelForCausalLM.from_config(config, **options)
    hf.config.use_cache = False  # training and scoring whole blocks: no key/value cache
    return CausalLM(hf)


def hidden_size(model: dict) -> int:
    """The model's width (DeepSpeed sizes its ZeRO-3 buckets by it), read from its config alone."""
    if model.get("hf_config") is not None:
        values = model["hf_config"]
        width = values.get("hidden_size") or values.get("n_embd") or values.get("d_model")
        if width:
            return int(width)
    config = hf_config(model, 0)
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024)


def save_hf(directory: Path, state_dict: dict[str, torch.Tensor], config, special_tokens: dict[str, int]) -> list[str]:
    """Write a transformers folder: config.json and generation_config.json (with the tokenizer's
    special token ids) and the weights as safetensors, sharded above MAX_SHARD_SIZE. Returns the
    files written. `state_dict` is `CausalLM`'s (keys under `hf.`), tied weights listed once."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    config = copy.deepcopy(config)
    for name, value in special_tokens.items():
        setattr(config, name, value)
    config.use_cache = True  # the exported model is for inference
    before = set(p.name for p in directory.iterdir())
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    weights = {key.removeprefix("hf."): value for key, value in state_dict.items()}
    save_torch_state_dict(weights, directory, max_shard_size=MAX_SHARD_SIZE)
    return sorted(p.name for p in directory.iterdir() if p.name not in before)


def load_hf(directory: Path | str, dtype: torch.dtype = torch.float32) -> CausalLM:
    """An exported transformers folder, loaded by transformers itself, in eval mode."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, use_kernels=False)
    return CausalLM(hf).eval()
