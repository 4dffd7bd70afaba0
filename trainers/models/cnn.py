"""A small convolutional classifier for images given as flat feature vectors."""

from __future__ import annotations


import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self, input_shape: list[int], num_classes: int, width: int, depth: int, dropout: float):
        super().__init__()
        channels, height, width_px = input_shape
        self.input_shape = tuple(input_shape)
        blocks, in_ch = [], channels
        for i in range(depth):
            out_ch = width * 2**i
            blocks += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
            if min(height, width_px) >= 2:  # pool while there is something left to pool
                blocks.append(nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        hidden = width * 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_ch * height * width_px, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, *self.input_shape)))


def build_cnn(model: dict, input_shape: list[int], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs an image shape [channels, height, width], got {input_shape}")
    return CNN(input_shape, num_classes, model["width"], model["depth"], model["dropout"])
