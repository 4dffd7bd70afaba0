"""A model directory: `model.safetensors` (fp32 weights) beside `model.json` (how to rebuild it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainers.models import build_model

WEIGHTS, SPEC = "model.safetensors", "model.json"


# What turns raw input into the model's input (trainers.export reads these for `raylaunch predict`).
PREPROCESS_KEYS = ("task", "format", "feature_columns", "stored_shape", "normalize", "augment", "seed", "tokenizer",
                   "vocab_size", "seq_len")


def model_spec(model: dict, data_meta: dict) -> dict:
    """What rebuilds a model and feeds it: its config section, the data's shape and classes, and
    the preprocessing its inputs went through (normalization statistics, tokenizer)."""
    return {"format": "fp32", "model": model, "input_shape": data_meta["input_shape"],
            "num_classes": data_meta["num_classes"], "classes": data_meta["classes"],
            "preprocess": {k: data_meta[k] for k in PREPROCESS_KEYS if k in data_meta}}


def save_model_dir(directory: Path, state_dict: dict[str, torch.Tensor], spec: dict) -> None:
    """Write weights and spec; each file goes to a temporary name first and is renamed into place,
    so a reader never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / SPEC, lambda p: p.write_text(json.dumps(spec, indent=1)))


def load_model_dir(directory: Path | str) -> tuple[nn.Module, dict]:
    """The fp32 model in `directory`, in eval mode, and its spec."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC).read_text())
    model = build_model(spec["model"], spec["input_shape"], spec["num_classes"])
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval(), spec


def atomic_write(path: Path, write) -> None:
    """`write(temporary path)`, then rename it to `path`: a reader never sees half a file, and a
    write that fails leaves nothing behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
