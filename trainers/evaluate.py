"""Measuring a model on the held-out test split: accuracy (perplexity), size, CPU latency and throughput."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataprep import IGNORE
from dataprep.stream import stream_folder
from trainers.batches import model_batch, model_kwargs
from trainers.models import PRETRAINED, build_model, count_params
from trainers.models.hf import generation_model


@torch.inference_mode()
def test_metrics(model: nn.Module, test_dir: Path | str, meta: dict, batch_size: int = 256) -> dict:
    """Top-1 accuracy (next-token accuracy for a language model) and mean cross-entropy over a
    preprocessed split, streamed through Ray Data in batches; a language model adds perplexity."""
    correct = total = 0
    loss_sum = 0.0
    lm = False
    for batch in stream_folder(test_dir).iter_torch_batches(batch_size=batch_size, device="cpu"):
        x, labels = model_batch(batch, meta)
        logits = model(x, **model_kwargs(batch))
        lm = logits.dim() == 3
        logits, labels = logits.flatten(0, -2).float(), labels.flatten()
        counted = labels != IGNORE  # instruction data: the responses' tokens only
        correct += ((logits.argmax(-1) == labels) & counted).sum().item()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE).item()
        total += counted.sum().item()
    metrics = {"accuracy": correct / total, "loss": loss_sum / total}
    if lm:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


@torch.inference_mode()
def latency(model: nn.Module, example: torch.Tensor, seconds: float = 0.6, batch_size: int = 64) -> dict:
    """CPU latency of one forward pass on a single row (median and 95th percentile over about
    `seconds` of repeats, after a warm-up) and throughput in rows/s at `batch_size`."""
    one = example[:1]
    batch = one.expand(batch_size, *one.shape[1:]).contiguous()
    for _ in range(20):
        model(one)
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < 50 or (time.perf_counter() < deadline and len(times) < 20_000):
        start = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - start)
    model(batch)
    # At least two timed batches: a language model's batch of 64 full windows takes seconds on a CPU.
    batches, start = 0, time.perf_counter()
    while batches < 2 or time.perf_counter() - start < seconds / 2:
        model(batch)
        batches += 1
    elapsed = time.perf_counter() - start
    p50, p95 = np.percentile(np.array(times) * 1e3, [50, 95])
    return {"latency_ms_p50": float(p50), "latency_ms_p95": float(p95), "rows_per_s_b64": batches * batch_size / elapsed}


def interleaved_latency(models: dict[str, nn.Module], example: torch.Tensor, rounds: int = 3,
                        seconds: float = 0.6) -> dict[str, dict]:
    """`latency` of each model, measured in `rounds` rounds of `seconds / rounds` each that take
    the models in turns (the order rotated every round), and the median of the rounds: a burst of
    other work on the machine lands on one round of one model, not on a model's whole figure."""
    names = list(models)
    measured = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            measured[name].append(latency(models[name], example, seconds / rounds))
    return {name: {key: float(np.median([r[key] for r in runs])) for key in runs[0]} for name, runs in measured.items()}


GEN_BATCHES = (1, 8)


@torch.inference_mode()
def greedy(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` more tokens for each row of `prompts`, greedily: a transformers model through
    its own `generate` (key/value cache; exactly `new_tokens`, whatever the end-of-text token), any
    other language model (or one without `generate`) by a forward pass over the last window of
    its width each token."""
    hf = generation_model(model)
    if hf is not None:
        return hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, prompts.shape[1]:]
    width, tokens = prompts.shape[1], prompts
    for _ in range(new_tokens):
        token = model(tokens[:, -width:])[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, token], dim=1)
    return tokens[:, width:]


def generation_speed(models: dict[str, nn.Module], rows: torch.Tensor, rounds: int = 2) -> dict[str, dict]:
    """New tokens per second that each language model generates greedily at batch 1 and 8
    (`gen_tokens_per_s_b1`, `_b8`), from prompts made of `rows` (test rows: a transformers model
    gets their first half, generating the rest of the window; others their whole window), after a
    warm-up; rounds take the models in turns (the order rotated) and the median counts."""
    width = rows.shape[1]
    new_tokens = max(1, min(32, width // 2))
    names = list(models)
    measured: dict[str, dict[str, list]] = {name: {f"gen_tokens_per_s_b{b}": [] for b in GEN_BATCHES} for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            model = models[name]
            for batch in GEN_BATCHES:
                prompts = rows[:batch] if len(rows) >= batch else rows[:1].expand(batch, -1)
                prompts = prompts[:, : width - new_tokens] if generation_model(model) is not None else prompts
                greedy(model, prompts, 2)
                start = time.perf_counter()
                greedy(model, prompts, new_tokens)
                measured[name][f"gen_tokens_per_s_b{batch}"].append(batch * new_tokens / (time.perf_counter() - start))
    return {name: {key: float(np.median(values)) for key, values in runs.items()} for name, runs in measured.items()}


def measure(spec: dict, directory: Path, quality: dict, timing: dict) -> dict:
    """The numbers the report shows for one model, given its `test_metrics` and its
    `interleaved_latency`. `params` counts the architecture's parameters (a quantized model stores
    the same ones in fewer bytes); `size_bytes` its weights' files."""
    from trainers.modeldir import weights_bytes

    model = spec["model"]
    if model["type"] in PRETRAINED:  # the export's own config, not the folder training started from
        from trainers.models.hf import DATA_TASKS

        model = {**model, "name_or_path": str(directory), "hf_config": None, "task": DATA_TASKS[spec["preprocess"]["task"]]}
    with torch.device("meta"):  # counted, never allocated
        architecture = build_model(model, spec["input_shape"], spec["num_classes"], weights=False)
    return {
        **quality,
        "params": count_params(architecture),
        "size_bytes": weights_bytes(directory),
        **timing,
    }


def first_rows(folder: Path | str, meta: dict, rows: int) -> torch.Tensor:
    """The model inputs of a split's first `rows` rows (as evaluated: no augmentation)."""
    parts, have = [], 0
    for batch in stream_folder(folder).iter_torch_batches(batch_size=min(rows, 256), device="cpu"):
        parts.append(model_batch(batch, meta)[0])
        have += len(parts[-1])
        if have >= rows:
            break
    return torch.cat(parts)[:rows]
