"""The training loop's bookkeeping between reports: losses read back late, checked, summed."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from trainers.loop import _diverged, _Stopwatch, _Window


def _window() -> _Window:
    return _Window(partial(_diverged, lr_path="train.lr", lr=0.1))


def test_settle_keeps_the_last_steps_queued_and_sums_the_rest():
    window = _window()
    for step, losses in enumerate([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]], start=1):
        for micro, loss in enumerate(losses):
            window.add(torch.tensor(loss), items=4, epoch=0, micro_batch=2 * (step - 1) + micro)
        window.step_done(step, lr=0.1)
    window.settle(keep=1)  # a GPU keeps the step in flight queued
    assert window.steps == [[1, 2.0, 0.1], [2, 2.0, 0.1]]
    assert (window.loss_sum, window.micro_batches, window.items) == (8.0, 4, 24)
    window.settle(keep=0)  # before a report
    assert window.steps[-1] == [3, 6.0, 0.1]
    assert (window.loss_sum, window.micro_batches) == (20.0, 6)


def test_a_non_finite_loss_names_its_step_epoch_and_micro_batch():
    window = _window()
    window.add(torch.tensor(1.0), 1, epoch=2, micro_batch=6)
    window.step_done(4, lr=0.1)
    window.add(torch.tensor(0.5), 1, epoch=2, micro_batch=8)
    window.add(torch.tensor(math.inf), 1, epoch=2, micro_batch=9)
    window.step_done(5, lr=0.1)
    window.settle(keep=1)  # step 4 is fine; step 5 is not read yet
    with pytest.raises(FloatingPointError, match=r"the loss is inf at step 5 \(epoch 3, micro batch 10\); lower train.lr"):
        window.settle(keep=0)


def test_stopwatch_counts_only_the_time_spent_waiting_for_items():
    import time

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    watch = _Stopwatch()
    seen = []
    started = time.perf_counter()
    for item in watch.around(slow()):
        time.sleep(0.05)  # the loop's own work is not counted
        seen.append(item)
    elapsed = time.perf_counter() - started
    waited = watch.take()
    assert seen == [0, 1, 2]
    assert 0.15 <= waited <= elapsed - 0.15
    assert watch.take() == 0.0
    assert 0.05 <= watch.take_first() <= waited - 0.1 and watch.take_first() is None  # the first item's wait alone

