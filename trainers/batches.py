"""What a model sees of a batch of a cached split: inputs and targets, augmented when training.

A classifier's batch has `features` and `label`; a language model's has `tokens` (seq_len + 1 per
row: the inputs are the first seq_len, the targets the last seq_len). Images trained with
augmentations get a fresh draw per (seed, epoch, row key); evaluation sees the centre crop when
training crops.
"""

from __future__ import annotations

import torch

from dataprep import find_transform
from dataprep.transforms import augment, center_crop


def model_batch(batch: dict, meta: dict, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch; `epoch` set means training (draw the augmentations)."""
    if "tokens" in batch:
        tokens = batch["tokens"].long()
        return tokens[:, :-1], tokens[:, 1:]
    x, y = batch["features"], batch["label"]
    steps = meta.get("augment") or []
    if not steps:
        return x, y
    if epoch is None:
        crop = find_transform(steps, "random_crop")
        return (center_crop(x, crop["size"]) if crop else x), y
    shift = torch.tensor(meta["normalize"]["shift"], dtype=x.dtype, device=x.device)
    scale = torch.tensor(meta["normalize"]["scale"], dtype=x.dtype, device=x.device)
    return augment(x, batch["key"].cpu().numpy(), steps, meta["seed"], epoch, shift, scale), y
