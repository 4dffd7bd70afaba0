"""Measuring a trained model on the held-out test split: accuracy, size and CPU latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import ray.data
import torch
from torch import nn

from trainers.models import count_params


@torch.inference_mode()
def accuracy(model: nn.Module, test_dir: Path | str, batch_size: int = 256) -> float:
    """Top-1 accuracy over a preprocessed split, streamed through Ray Data in batches."""
    correct = total = 0
    for batch in ray.data.read_parquet(str(test_dir)).iter_torch_batches(batch_size=batch_size, device="cpu"):
        correct += (model(batch["features"]).argmax(-1) == batch["label"]).sum().item()
        total += len(batch["label"])
    return correct / total


@torch.inference_mode()
def latency_ms_b1(model: nn.Module, example: torch.Tensor, repeats: int = 300, warmup: int = 30) -> float:
    """Median wall time of one forward pass on a single row, in milliseconds."""
    x = example[:1]
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(model: nn.Module, weights_file: Path, test_dir: Path | str, example: torch.Tensor) -> dict:
    """The numbers the report shows for one model."""
    return {
        "accuracy": accuracy(model, test_dir),
        "params": count_params(model),
        "size_bytes": weights_file.stat().st_size,
        "latency_ms_b1": latency_ms_b1(model, example),
    }
