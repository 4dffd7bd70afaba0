"""The model registry: a plain dict from `model.type` to a builder, one file per family."""

from __future__ import annotations

from torch import nn

from trainers.models.cnn import build_cnn
from trainers.models.gpt import build_gpt
from trainers.models.mlp import build_mlp

BUILDERS = {"cnn": build_cnn, "mlp": build_mlp, "gpt": build_gpt}


def build_model(model: dict, input_shape: list[int], num_classes: int) -> nn.Module:
    """Build the model a `model` config section describes for this data (a classifier, or a language
    model whose `num_classes` is the vocabulary)."""
    return BUILDERS[model["type"]](model, input_shape, num_classes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
