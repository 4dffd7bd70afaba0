"""The transforms of `data.transforms`, as functions Ray Data (preprocessing) and the training
workers (augmentations) call on batches.

Fitted transforms (standardize, minmax) learn their statistics from the train split with
`FeatureStats`, a Ray Data aggregation: each write task reduces its rows to a few vectors, and only
those reach the driver. They are applied as batches reach the model, after the augmentations.
Augmentations are drawn per row from a counter-based hash of (seed, epoch, row key), so a row's
crop or flip in epoch 3 is the same whichever worker sees it, in whatever batch, before or after
a resume; and different in epoch 4.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np
from ray.data.aggregate import AggregateFnV2
from ray.data.block import BlockAccessor

from dataprep import find_transform

if TYPE_CHECKING:  # torch is imported where augmentations run: the preprocessing tasks never load it
    import torch


class FeatureStats(AggregateFnV2):
    """Count, sum, sum of squares, min and max of a tensor column, per feature (every element of
    a row's tensor) or per channel (axis 1 of a [channels, height, width] image)."""

    def __init__(self, on: str, per: str):
        self._per = per
        super().__init__(f"stats({on})", zero_factory=lambda: None, on=on, ignore_nulls=False)

    def aggregate_block(self, block):
        x = np.asarray(BlockAccessor.for_block(block).to_numpy(self._target_col_name), dtype=np.float64)
        if len(x) == 0:
            return None
        x = x.reshape(len(x), -1) if self._per == "feature" else x.swapaxes(0, 1).reshape(x.shape[1], -1).T
        return [len(x), x.sum(0), (x * x).sum(0), x.min(0), x.max(0)]

    def combine(self, current, new):
        if current is None or new is None:
            return new if current is None else current
        return [current[0] + new[0], current[1] + new[1], current[2] + new[2],
                np.minimum(current[3], new[3]), np.maximum(current[4], new[4])]

    def finalize(self, accumulator):
        return accumulator


def shift_and_scale(stats, method: str | None, per: str, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (or per-channel) shift and scale from `FeatureStats`, shaped to broadcast over a
    row of `shape`; a constant feature gets scale 1 (it becomes 0, not NaN). No method: 0 and 1."""
    target = shape if per == "feature" else [shape[0]] + [1] * (len(shape) - 1)
    if method is None:
        return np.zeros(target, np.float32), np.ones(target, np.float32)
    count, total, squares, low, high = stats
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    if method == "standardize":
        shift, scale = mean, np.where(std > 1e-8, std, 1.0)
    elif method == "minmax":
        shift, scale = low, np.where(high - low > 1e-8, high - low, 1.0)
    else:
        raise ValueError(f"unknown normalization {method!r}")
    return shift.reshape(target).astype(np.float32), scale.reshape(target).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Augmentations: applied by the training workers to each batch, a fresh draw every epoch.


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(keys: np.ndarray, seed: int, epoch: int, draw: int) -> np.ndarray:
    """A number in [0, 1) per row key, fixed by (seed, epoch, draw): the same on every run."""
    with np.errstate(over="ignore"):
        salt = _splitmix(np.array([((seed * 1_000_003 + epoch) * 64 + draw) % 2**64], dtype=np.uint64))
        bits = _splitmix(keys.astype(np.uint64) ^ salt)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def augment(x: torch.Tensor, keys: np.ndarray, transforms: list[dict], seed: int, epoch: int) -> torch.Tensor:
    """Apply the augmentations among `transforms` to a batch of images [n, C, H, W] with pixels
    in [0, 1], before normalization: brightness scales the pixels, and crops and rotations fill
    with black (0)."""
    import torch
    import torch.nn.functional as F

    for draw, t in enumerate(transforms):
        u = lambda k: torch.as_tensor(uniform(keys, seed, epoch, 8 * draw + k), dtype=x.dtype, device=x.device)  # noqa: E731
        if t["type"] == "flip":
            if t["horizontal"]:
                x = torch.where((u(0) < 0.5)[:, None, None, None], x.flip(-1), x)
            if t["vertical"]:
                x = torch.where((u(1) < 0.5)[:, None, None, None], x.flip(-2), x)
        elif t["type"] == "brightness":
            x = x * (1 + (2 * u(0) - 1) * t["max_delta"])[:, None, None, None]
        elif t["type"] == "rotate":
            angle = (2 * u(0) - 1) * math.radians(t["degrees"])
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif t["type"] == "random_crop":
            x = _random_crop(x, t["size"], t["padding"], u(0), u(1))
    return x


def _random_crop(x: torch.Tensor, size, padding: int, u_top: torch.Tensor, u_left: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    n, _, height, width = x.shape
    h, w = size
    if padding:
        x = F.pad(x, (padding,) * 4)
    top = (u_top * (height + 2 * padding - h + 1)).long()
    left = (u_left * (width + 2 * padding - w + 1)).long()
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return x[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def center_crop(x: torch.Tensor, size) -> torch.Tensor:
    """What validation, test and inference see when training crops: the middle `size`."""
    h, w = size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top: top + h, left: left + w]


def model_input_shape(shape: list[int], transforms: list[dict]) -> list[int]:
    """The [C, H, W] the model sees: the stored images' shape, cropped if training crops."""
    crop = find_transform(transforms, "random_crop")
    return [shape[0], *crop["size"]] if crop else list(shape)
