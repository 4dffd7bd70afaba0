"""The model registry: a plain dict from `model.type` to a builder, one file per family."""

from __future__ import annotations

from torch import nn

from trainers.models.cnn import build_cnn
from trainers.models.gpt import build_gpt
from trainers.models.mlp import build_mlp
from trainers.models.python import build_python



def build_hf(model: dict, input_shape: list[int], num_classes: int, weights: bool = True) -> nn.Module:
    from trainers.models.hf import build_hf  # transformers is imported only by runs that use it

    return build_hf(model, input_shape, num_classes, weights)


BUILDERS = {"cnn": build_cnn, "mlp": build_mlp, "gpt": build_gpt, "hf": build_hf, "python": build_python}
PRETRAINED = ("hf",)
"""The families whose builders can load weights (`weights=False`: the architecture, fresh)."""


def build_model(model: dict, input_shape: list[int], num_classes: int, weights: bool = True) -> nn.Module:
    """Build the model a `model` config section describes for this data (a classifier, or a language
    model whose `num_classes` is the vocabulary); `weights=False` skips loading a pretrained
    model's weights (the plan counts parameters on the meta device)."""
    if model["type"] in PRETRAINED:
        return BUILDERS[model["type"]](model, input_shape, num_classes, weights)
    return BUILDERS[model["type"]](model, input_shape, num_classes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
