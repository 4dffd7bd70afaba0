"""Augmentations: a fresh draw every epoch, the same draw for the same (seed, epoch, row) however the
rows are batched, and acting on pixels as they were before normalization. Pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import torch

from dataprep.transforms import augment, center_crop, uniform

FLIP = {"type": "flip", "horizontal": True, "vertical": False}
CROP = {"type": "random_crop", "size": [6, 6], "padding": 2}
ROTATE = {"type": "rotate", "degrees": 30.0}
BRIGHT = {"type": "brightness", "max_delta": 0.5}
ZERO, ONE = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)


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
    whole = augment(x, keys, steps, seed=3, epoch=0, shift=ZERO, scale=ONE)
    halves = torch.cat([augment(x[:7], keys[:7], steps, 3, 0, ZERO, ONE), augment(x[7:], keys[7:], steps, 3, 0, ZERO, ONE)])
    torch.testing.assert_close(whole, halves)
    assert whole.shape == (16, 1, 6, 6)
    assert not torch.allclose(whole, augment(x, keys, steps, seed=3, epoch=1, shift=ZERO, scale=ONE))


def test_flip_mirrors_about_half_the_images():
    x, keys = _images(400)
    out = augment(x, keys, [FLIP], seed=0, epoch=0, shift=ZERO, scale=ONE)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and 150 < flipped.sum() < 250


def test_crop_with_padding_fills_black_in_pixel_space():
    x = torch.ones(64, 1, 4, 4)
    shift, scale = torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 0.25)
    normalized = (x - shift) / scale
    out = augment(normalized, np.arange(64, dtype=np.int64), [{"type": "random_crop", "size": [4, 4], "padding": 2}],
                  seed=0, epoch=0, shift=shift, scale=scale)
    pixels = out * scale + shift
    assert set(pixels.unique().tolist()) <= {0.0, 1.0} and (pixels == 0).any()  # padding is black, not "0 after scaling"


def test_brightness_scales_pixels_not_normalized_values():
    x = torch.full((32, 1, 2, 2), 0.4)
    shift, scale = torch.full((1, 1, 1), 0.3), torch.full((1, 1, 1), 0.2)
    out = augment((x - shift) / scale, np.arange(32, dtype=np.int64), [BRIGHT], 0, 0, shift, scale) * scale + shift
    factor = out[:, 0, 0, 0] / 0.4
    assert (factor >= 0.5 - 1e-5).all() and (factor <= 1.5 + 1e-5).all() and factor.std() > 0.1
    torch.testing.assert_close(out, factor[:, None, None, None].expand_as(out) * 0.4)


def test_evaluation_sees_the_centre_crop():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    torch.testing.assert_close(center_crop(x, [4, 4]), x[..., 2:6, 2:6])
