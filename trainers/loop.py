"""The per-worker training function Ray Train runs on every rank.

Everything a worker needs arrives in its plain-dict config and through
`ray.train.get_dataset_shard`; everything it gives back leaves through `ray.train.report`.
The same loop trains a teacher (cross-entropy) and a student (distillation loss against a
frozen teacher loaded on each worker).
"""

from __future__ import annotations

import math
import tempfile
import time
from functools import partial
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainers.checkpoint import load_model_dir, model_spec, save_model_dir
from trainers.deepspeed_config import DTYPES, deepspeed_config
from trainers.distill import distillation_loss
from trainers.models import build_model


def loop_config(run: dict, data_meta: dict, teacher_dir: str | None = None) -> dict:
    """The config one training run's workers receive, from a resolved run config (a plain dump,
    possibly with a sweep's overrides applied). With `teacher_dir` it trains `distill.student`."""
    train = dict(run["train"])
    model = run["model"]
    distill, lr_path = None, "train.lr"
    if teacher_dir is not None:
        model = run["distill"]["student"]
        train["epochs"] = run["distill"]["epochs"] or train["epochs"]
        train["lr"] = run["distill"]["lr"] or train["lr"]
        lr_path = "distill.lr" if run["distill"]["lr"] else lr_path
        distill = {"teacher_dir": teacher_dir, "temperature": run["distill"]["temperature"],
                   "alpha": run["distill"]["alpha"]}
    return {"model": model, "train": train, "data_meta": data_meta, "distill": distill,
            "metric": run["tune"]["metric"], "lr_path": lr_path}


def train_loop_per_worker(config: dict) -> None:
    import deepspeed  # imported on the worker: it probes the accelerator at import time

    train, meta = config["train"], config["data_meta"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(train["seed"])  # same seed on every rank: identical initial weights
    model = build_model(config["model"], meta["input_shape"], meta["num_classes"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(train, train["lr"]))
    dtype = DTYPES[train["precision"]]
    loss_fn, teacher = _loss_and_teacher(config["distill"], engine.device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(train["epochs"]):
        engine.train()
        started, loss_sum, batches, rows = time.perf_counter(), 0.0, 0, 0
        # drop_last: every rank gets the same row count (streaming_split(equal=True)), so the same
        # number of full batches; a ragged last batch would make ranks disagree under ZeRO-3.
        for batch in train_shard.iter_torch_batches(batch_size=train["micro_batch_size"], drop_last=True,
                                                     local_shuffle_buffer_size=4 * train["micro_batch_size"],
                                                     local_shuffle_seed=train["seed"] * 1000 + epoch,
                                                     device=engine.device):
            x, y = batch["features"].to(dtype), batch["label"]
            logits = engine(x).float()
            loss = loss_fn(logits, y, teacher(x.float()) if teacher is not None else None)
            engine.backward(loss)
            engine.step()
            loss_sum, batches, rows = loss_sum + loss.item(), batches + 1, rows + len(y)
        elapsed = time.perf_counter() - started
        metrics = _validate(engine, val_shard, dtype, train["micro_batch_size"])
        totals = _all_reduce_sum(torch.tensor([loss_sum, batches, rows], dtype=torch.float64), engine.device)
        metrics.update(epoch=epoch + 1, train_loss=totals[0] / max(totals[1], 1), samples_per_s=totals[2] / elapsed)
        if not math.isfinite(metrics["train_loss"]):
            # Checked on the all-reduced value, so every rank stops at the same epoch (a rank
            # raising alone would leave the others waiting in a collective).
            raise FloatingPointError(f"training diverged: train loss is {metrics['train_loss']} in epoch {epoch + 1}; "
                                     f"lower {config['lr_path']} (now {train['lr']:g})")
        _report(metrics, _full_state_dict(engine), model_spec(config["model"], meta), rank)


def _loss_and_teacher(distill: dict | None, device):
    if distill is None:
        return (lambda logits, labels, _teacher_logits: F.cross_entropy(logits, labels)), None
    teacher, _ = load_model_dir(distill["teacher_dir"])
    teacher = teacher.to(device).requires_grad_(False)
    kd = partial(distillation_loss, temperature=distill["temperature"], alpha=distill["alpha"])
    return (lambda logits, labels, teacher_logits: kd(logits, teacher_logits, labels)), teacher


@torch.no_grad()
def _validate(engine, shard, dtype, batch_size: int) -> dict:
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=engine.device):
        logits = engine(batch["features"].to(dtype)).float()
        sums += torch.tensor([F.cross_entropy(logits, batch["label"], reduction="sum").item(),
                              (logits.argmax(-1) == batch["label"]).sum().item(), len(batch["label"])],
                             dtype=torch.float64)
    loss, correct, count = _all_reduce_sum(sums, engine.device)
    return {"val_loss": loss / count, "val_accuracy": correct / count, "val_rows": int(count)}


def _all_reduce_sum(values: torch.Tensor, device) -> list[float]:
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu().tolist()


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights. Under ZeRO-3 each rank holds only a slice of every parameter,
    so they are gathered first: a collective, every rank must call this."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _report(metrics: dict, state_dict: dict, spec: dict, rank: int) -> None:
    """Report the epoch's metrics on every rank; rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(Path(tmp), state_dict, spec)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
