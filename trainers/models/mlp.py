"""A multilayer perceptron for tabular rows."""

from __future__ import annotations

import math

from torch import nn


def build_mlp(model: dict, input_shape: list[int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    in_features = math.prod(input_shape)
    for _ in range(model["depth"]):
        layers += [nn.Linear(in_features, model["width"]), nn.ReLU()]
        in_features = model["width"]
    layers += [nn.Dropout(model["dropout"]), nn.Linear(in_features, num_classes)]
    return nn.Sequential(*layers)
