"""What a model sees of a batch of a cached split: inputs and targets, augmented when training.

A classifier's batch has `features` (images as uint8 pixels) and `label`; a language model's has
`tokens` (seq_len + 1 per row: the inputs are the first seq_len, the targets the last seq_len),
and instruction data `labels` (the targets, IGNORE where there is no loss) and, packed, `positions`.
Pixels are scaled to [0, 1]; images trained with augmentations get a fresh draw per (seed, epoch,
row key), and evaluation sees the centre crop when training crops; then the normalization
fitted on the train split applies (`meta["normalize"]`).
"""

from __future__ import annotations

import torch

from dataprep import find_transform
from dataprep.transforms import augment, center_crop


def model_batch(batch: dict, meta: dict, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch; `epoch` set means training (draw the augmentations)."""
    if "tokens" in batch:
        tokens = batch["tokens"].long()
        # Instruction data: targets only where `labels` is not IGNORE (the responses).
        targets = batch["labels"].long() if "labels" in batch else tokens
        return tokens[:, :-1], targets[:, 1:]
    x, y = batch["features"], batch["label"]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    steps = meta.get("augment") or []
    if steps and epoch is not None:
        x = augment(x, batch["key"].cpu().numpy(), steps, meta["seed"], epoch)
    elif steps and (crop := find_transform(steps, "random_crop")):
        x = center_crop(x, crop["size"])
    return normalized(x, meta["normalize"]), y


def model_kwargs(batch: dict) -> dict:
    """What the model takes besides the inputs: position ids of packed instruction examples."""
    return {"positions": batch["positions"][:, :-1].long()} if "positions" in batch else {}


def normalized(x: torch.Tensor, normalize: dict) -> torch.Tensor:
    """`(x - shift) / scale` with the statistics fitted on the train split (per feature, or per
    channel of an image); nothing when the data section has no standardize or minmax."""
    if normalize["method"] == "none":
        return x
    shift = torch.tensor(normalize["shift"], dtype=x.dtype, device=x.device)
    scale = torch.tensor(normalize["scale"], dtype=x.dtype, device=x.device)
    return (x - shift) / scale
