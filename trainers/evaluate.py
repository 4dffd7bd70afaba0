"""Measuring a trained model on the held-out test split: accuracy, size and CPU latency."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dataprep.stream import stream_folder
from trainers.batches import model_batch
from trainers.models import count_params


@torch.inference_mode()
def test_metrics(model: nn.Module, test_dir: Path | str, meta: dict, batch_size: int = 256) -> dict:
    """Top-1 accuracy (next-token accuracy for a language model) and mean cross-entropy over a
    preprocessed split, streamed through Ray Data in batches; a language model adds perplexity."""
    correct = total = 0
    loss_sum = 0.0
    lm = False
    for batch in stream_folder(test_dir).iter_torch_batches(batch_size=batch_size, device="cpu"):
        x, labels = model_batch(batch, meta)
        logits = model(x)
        lm = logits.dim() == 3
        logits, labels = logits.flatten(0, -2).float(), labels.flatten()
        correct += (logits.argmax(-1) == labels).sum().item()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        total += labels.numel()
    metrics = {"accuracy": correct / total, "loss": loss_sum / total}
    if lm:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


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


def measure(model: nn.Module, weights_file: Path, test_dir: Path | str, meta: dict, example: torch.Tensor) -> dict:
    """The numbers the report shows for one model."""
    return {
        **test_metrics(model, test_dir, meta),
        "params": count_params(model),
        "size_bytes": weights_file.stat().st_size,
        "latency_ms_b1": latency_ms_b1(model, example),
    }
