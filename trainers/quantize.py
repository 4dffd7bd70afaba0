"""Post-training quantization with torchao, saved as a state dict beside its spec.

torch 2.13 deprecates `torch.ao.quantization` in favour of torchao's `quantize_`, which swaps
each nn.Linear's weight for a quantized tensor subclass in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from trainers.checkpoint import SPEC, load_model_dir
from trainers.models import build_model

QUANTIZED_WEIGHTS = "model.pt"


def _torchao_config(method: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"int8_dynamic": Int8DynamicActivationInt8WeightConfig, "int8_weight_only": Int8WeightOnlyConfig}[method]()


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` in place with a torchao method; returns it."""
    from torchao.quantization import quantize_

    quantize_(model.eval(), _torchao_config(method))
    return model


def quantize_model_dir(source: Path, target: Path, method: str) -> nn.Module:
    """Quantize the fp32 model in `source` and save it to `target` (its spec gains `quantization`)."""
    model, spec = load_model_dir(source)
    quantize_model(model, method)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{QUANTIZED_WEIGHTS}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, target / QUANTIZED_WEIGHTS)
    (target / SPEC).write_text(json.dumps({**spec, "quantization": method}, indent=1))
    return model


def load_quantized_dir(directory: Path | str) -> tuple[nn.Module, dict]:
    """Rebuild the architecture, apply the same quantization, then load the saved quantized tensors."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC).read_text())
    model = quantize_model(build_model(spec["model"], spec["input_shape"], spec["num_classes"]), spec["quantization"])
    # weights_only stays on: torchao registers its tensor subclasses as safe globals.
    model.load_state_dict(torch.load(directory / QUANTIZED_WEIGHTS, weights_only=True), assign=True)
    return model.eval(), spec
