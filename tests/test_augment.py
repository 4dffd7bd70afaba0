"""Augmentations: a fresh draw every epoch, the same draw for the same (seed, epoch, row) however the
rows are batched, and acting on pixels before the normalization (`model_batch` applies them in
that order to the cached uint8 pixels). Pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import torch

from dataprep.transforms import augment, center_crop, uniform
from trainers.batches import model_batch

FLIP = {"type": "flip", "horizontal": True, "vertical": False}
CROP = {"type": "random_crop", "size": [6, 6], "padding": 2}
ROTATE = {"type": "rotate", "degrees": 30.0}
BRIGHT = {"type": "brightness", "max_delta": 0.5}


def _images(n: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=generator), np.arange(1000, 1000 + n, dtype=np.int64)


def test_uniform_draws_are_fixed_by_seed_epoch_and_key():
    keys = np.arange(10_000, dtype=np.int64)
    a, b = uniform(keys, 0, 1, 0), uniform(keys, 0, 1, 0)
    assert (a == b).all() and 0 <= a.min() and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.01  # uniform enough to flip half the images
    assert (a != uniform(keys, 0, 2, 0)).mean() > 0.99  # another epoch, another draw
    assert (a != uniform(keys, 1, 1, 0)).mean() > 0.99  # another seed
    assert (a[:10] == uniform(keys[:10], 0, 1, 0)).all()  # a row's draw does not depend on the others


def test_augmentations_are_redrawn_each_epoch_and_independent_of_batching():
    x, keys = _images()
    steps = [CROP, FLIP, ROTATE, BRIGHT]
    whole = augment(x, keys, steps, seed=3, epoch=0)
    halves = torch.cat([augment(x[:7], keys[:7], steps, 3, 0), augment(x[7:], keys[7:], steps, 3, 0)])
    torch.testing.assert_close(whole, halves)
    assert whole.shape == (16, 1, 6, 6)
    assert not torch.allclose(whole, augment(x, keys, steps, seed=3, epoch=1))


def test_flip_mirrors_about_half_the_images():
    x, keys = _images(400)
    out = augment(x, keys, [FLIP], seed=0, epoch=0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and 150 < flipped.sum() < 250


def _meta(steps: list[dict], shift: float, scale: float) -> dict:
    return {"augment": steps, "seed": 0, "normalize": {"method": "standardize", "per": "channel",
                                                        "shift": [[[shift]]], "scale": [[[scale]]]}}


def test_crop_with_padding_fills_black_in_pixel_space():
    batch = {"features": torch.full((64, 1, 4, 4), 255, dtype=torch.uint8), "label": torch.zeros(64, dtype=torch.long),
             "key": torch.arange(64)}
    out, _ = model_batch(batch, _meta([{"type": "random_crop", "size": [4, 4], "padding": 2}], 0.5, 0.25), epoch=0)
    pixels = out * 0.25 + 0.5
    assert set(pixels.unique().tolist()) <= {0.0, 1.0} and (pixels == 0).any()  # padding is black, not "0 after scaling"


def test_brightness_scales_pixels_not_normalized_values():
    batch = {"features": torch.full((32, 1, 2, 2), 102, dtype=torch.uint8), "label": torch.zeros(32, dtype=torch.long),
             "key": torch.arange(32)}
    out = model_batch(batch, _meta([BRIGHT], 0.3, 0.2), epoch=0)[0] * 0.2 + 0.3
    factor = out[:, 0, 0, 0] / 0.4
    assert (factor >= 0.5 - 1e-5).all() and (factor <= 1.5 + 1e-5).all() and factor.std() > 0.1
    torch.testing.assert_close(out, factor[:, None, None, None].expand_as(out) * 0.4)


def test_a_batch_is_scaled_augmented_then_normalized_and_evaluation_is_not_augmented():
    pixels = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    batch = {"features": pixels, "label": torch.zeros(8, dtype=torch.long), "key": torch.arange(8)}
    meta = _meta([FLIP, CROP | {"size": [4, 4]}], 0.0, 1.0)
    meta["normalize"] |= {"shift": [[[0.1]], [[0.2]], [[0.3]]], "scale": [[[0.5]], [[0.25]], [[2.0]]]}
    shift, scale = torch.tensor(meta["normalize"]["shift"]), torch.tensor(meta["normalize"]["scale"])
    trained, _ = model_batch(batch, meta, epoch=2)
    expected = (augment(pixels.float() / 255, np.arange(8), meta["augment"], 0, 2) - shift) / scale
    torch.testing.assert_close(trained, expected)
    evaluated, _ = model_batch(batch, meta)
    torch.testing.assert_close(evaluated, (center_crop(pixels.float() / 255, [4, 4]) - shift) / scale)


def test_evaluation_sees_the_centre_crop():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    torch.testing.assert_close(center_crop(x, [4, 4]), x[..., 2:6, 2:6])
