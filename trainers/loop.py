"""The per-worker training function Ray Train runs on every rank.

Everything a worker needs arrives in its `WorkerConfig` (built once on the driver by
`trainers.worker.worker_config`) and through `ray.train.get_dataset_shard`; everything it gives back
leaves through `ray.train.report`. The same loop trains a teacher (cross-entropy) and a student (distillation
loss against a frozen teacher), classifiers and language models alike: a batch is `features`
and `label`, and for a language model both are token blocks, the label shifted by one.

A checkpoint holds everything an exact resume needs: DeepSpeed's own checkpoint (weights,
optimizer and scheduler state, one optimizer shard per rank under ZeRO), every rank's RNG
states, and the position in the data (epoch, micro batch). Beside it, rank 0 writes the
consolidated fp32 model (`model.safetensors` + `model.json`) that later stages load.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from functools import partial
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.raycompat import HeldShard
from cluster.remote import local_dir
from trainers import import_deepspeed
from dataprep import IGNORE
from trainers.batches import model_batch, model_kwargs
from trainers.distill import LOGITS, TOPK_INDICES, TOPK_VALUES, distillation_loss, topk_distillation_loss
from trainers.modeldir import load_model_dir, model_spec, save_model_dir
from trainers.models import build_model
from trainers.worker import Distillation, WorkerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
POSITION = "position.json"


def train_loop_per_worker(config: WorkerConfig) -> None:
    # Wall-clock times of this worker's start, sent with its first report (bench/first_step.py).
    startup = {"loop_start": time.time()}
    deepspeed = import_deepspeed()  # imported on the worker: it probes the accelerator at import time

    train, meta = config.train, config.data
    context = ray.train.get_context()
    rank = context.get_world_rank()
    model_section = config.model.model_dump(mode="json")
    # Before the model: a transformers teacher loaded while ZeRO-3's HfDeepSpeedConfig lives would
    # be partitioned too, and it runs whole on every rank.
    loss_fn = _loss(config.distill, ray.train.torch.get_device(), config.model.loss)
    torch.manual_seed(train.seed)  # same seed on every rank: identical initial weights
    model, hf_deepspeed, model_section = _build(config, model_section)  # hf_deepspeed: kept alive as long as the model
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = train.activation_checkpointing
    # Only what trains reaches the optimizer (LoRA: the adapters; the base weights stay frozen).
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config.deepspeed)
    skip_lone_allreduce(engine)
    startup["engine_ready"] = time.time()
    dtype = DTYPES[train.precision]
    train_shard, val_shard = (ray.train.get_dataset_shard(shard_name(split, rank, config.rank_shards))
                              for split in ("train", "val"))
    if config.rank_shards:
        train_shard, val_shard = HeldShard(train_shard), HeldShard(val_shard)
    spec = model_spec(model_section, meta)

    position = {"epoch": 0, "micro_batch": 0, "step": 0}
    checkpoint = ray.train.get_checkpoint()  # a restart after a failure, or `--resume`: continue exactly where it stopped
    adopted = checkpoint is None and config.start_from is not None
    if adopted:  # PBT: another trial's checkpoint, continued with this trial's (perturbed) values
        checkpoint = ray.train.Checkpoint(config.start_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            position = _load_state(engine, Path(directory), rank, adapters_only=bool(config.model.lora))
        if adopted:
            _apply_optimizer_values(engine, config.deepspeed)

    accum = train.grad_accum_steps
    micro_per_epoch = config.micro_batches_per_epoch
    every = train.checkpoint_every
    if adopted and position["epoch"] >= train.epochs:
        # PBT handed this trial another trial's checkpoint from the end of training: nothing is
        # left to train, but Tune must still hear that the trial is at its last epoch, with the
        # weights it now holds (else it ends reporting an earlier epoch, as if stopped early).
        _checkpoint(engine, config, spec, rank, _Window(None), val_shard, dtype, dict(position))
    # A non-finite loss. `skip`: every rank must agree before dropping a micro batch, a collective
    # and a host sync per micro batch. `fail`: each rank checks its own losses as they are read
    # back (a rank that raises ends the run), a step late on an accelerator so that it never
    # waits for the step in flight; no checkpoint is taken before every loss is checked.
    skip_bad = train.on_nan == "skip"
    diverged = partial(_diverged, lr_path=config.lr_path, lr=train.lr)
    lag = 1 if engine.device.type == "cuda" else 0
    waiting = _Stopwatch()
    for epoch in range(position["epoch"], train.epochs):
        engine.train()
        started, since_report = time.perf_counter(), _Window(diverged)
        skip = position["micro_batch"] if epoch == position["epoch"] else 0
        # On a GPU the batches are pinned: a copy from pageable memory waits for all the work queued
        # before it, which would stop the CPU queueing ahead.
        batches = train_shard.iter_torch_batches(batch_size=train.micro_batch_size, drop_last=True,
                                                 local_shuffle_buffer_size=max(config.shuffle_buffer, train.micro_batch_size),
                                                 local_shuffle_seed=train.seed * 1000 + epoch, device=engine.device,
                                                 pin_memory=engine.device.type == "cuda")
        # Every rank walks the whole shard (equal row counts: the same number of batches), trains
        # on the first `micro_per_epoch` and, after a resume, passes over the ones already trained.
        for index, batch in enumerate(waiting.around(batches)):
            startup.setdefault("first_batch", time.time())
            if index < skip or index >= micro_per_epoch:
                continue
            if config.trace:
                _trace(config.trace, rank, epoch, index, batch)
            x, y = model_batch(batch, meta, epoch)
            x = _model_input(x, dtype)
            loss = loss_fn(engine(x, **model_kwargs(batch)).float(), y, batch, x)
            if skip_bad and not _finite_everywhere(loss, engine.device):
                since_report.skipped += 1
                continue  # every rank skips the same micro batch: the accumulation stays aligned
            engine.backward(loss)
            engine.step()
            since_report.add(loss, y.numel(), epoch, index)
            if (index + 1) % accum:
                continue
            position["step"] += 1
            since_report.step_done(position["step"], float(engine.get_lr()[0]))
            since_report.settle(keep=lag)
            startup.setdefault("first_step", time.time())
            _fault(config, rank, position["step"], "step")
            last_step_of_epoch = index + 1 == micro_per_epoch
            if every and position["step"] % every == 0 and not last_step_of_epoch:
                since_report.close(time.perf_counter() - started, waiting.take())
                _checkpoint(engine, config, spec, rank, since_report, val_shard, dtype,
                            {"epoch": epoch, "micro_batch": index + 1, "step": position["step"]}, startup)
                started, since_report = time.perf_counter(), _Window(diverged)
                engine.train()
        since_report.close(time.perf_counter() - started, waiting.take())
        _checkpoint(engine, config, spec, rank, since_report, val_shard, dtype,
                    {"epoch": epoch + 1, "micro_batch": 0, "step": position["step"]}, startup)


def _build(config: WorkerConfig, section: dict):
    """The model, what must stay alive while it trains, and the model section its spec records. A
    transformers model loads in the training precision's dtype (model.dtype unless set); at ZeRO-3
    it is built partitioned: with transformers' HfDeepSpeedConfig alive, each parameter is created
    inside deepspeed.zero.Init and scattered at once, so no rank ever holds the whole model. A
    student derived from its teacher is written to a folder of this worker's first, and loaded from it."""
    if section["type"] != "hf":
        return build_model(section, config.data["input_shape"], config.data["num_classes"]), None, section
    from trainers.models.hf import DATA_TASKS

    meta, zero3, weights, folder = config.data, None, True, None
    built = {**section, "dtype": section["dtype"] or HF_DTYPES[config.train.precision],
             "task": DATA_TASKS[meta["task"]], "special_tokens": meta.get("special_tokens"), "classes": meta["classes"],
             "vocab_size": meta.get("vocab_size")}
    if section["overrides"] is not None:  # before ZeRO-3's config: it sizes the student on the meta device
        from trainers.models.hf_student import derive_student

        folder = tempfile.TemporaryDirectory(prefix="raylaunch-student-")
        built, weights = derive_student(built, Path(local_dir(config.distill.teacher_dir)), Path(folder.name))
    if config.deepspeed["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # DeepSpeed checks the batch sizes against its own view of the world size, which it
        # takes from Ray Train's process group only once its comm layer is set up.
        import_deepspeed().init_distributed()
        zero3 = HfDeepSpeedConfig(config.deepspeed)  # transformers keeps only a weak reference to it
    try:
        model = build_model(built, meta["input_shape"], meta["num_classes"], weights)
    finally:
        if folder is not None:
            folder.cleanup()
    return model, zero3, {**section, "trust_remote_code": built["trust_remote_code"]}


def shard_name(split: str, rank: int, per_rank: bool) -> str:
    """The dataset a rank reads `split` from: its own shard (`trainers.fit.rank_shards`), or its
    part of the shared split."""
    return f"{split}.{rank}" if per_rank else split


def _fault(config: WorkerConfig, rank: int, step: int, where: str) -> None:
    """Fault injection for the failure tests (`WorkerConfig.fault`; the driver never sets it)."""
    fault = config.fault
    if fault and (fault.rank, fault.step, fault.where) == (rank, step, where) and not os.path.exists(fault.marker):
        Path(fault.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _trace(folder: str, rank: int, epoch: int, index: int, batch: dict) -> None:
    """For the data tests: `WorkerConfig.trace` names a folder where each rank writes, as it trains on
    them, the keys of the rows of each micro batch (one JSON line per micro batch, in order; a
    restarted worker group writes again from where it continues). The driver never sets it."""
    record = {"pid": os.getpid(), "epoch": epoch, "index": index, "keys": batch["key"].tolist()}
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class _Window:
    """Training numbers since the last report.

    Losses stay on the device until they are settled: reading a loss back is a host sync, and
    one per micro batch would leave an accelerator idle while the next batch is fetched and
    launched. Each step's losses are copied to host memory as the step is queued; `settle` reads
    back all but the last `keep` steps, checks them (`on_bad(value, step, epoch, micro_batch)`
    raises for a non-finite one) and adds them up."""

    def __init__(self, on_bad):
        self.on_bad = on_bad
        self.loss_sum, self.micro_batches, self.items, self.skipped, self.seconds = 0.0, 0, 0, 0, 0.0
        self.data_wait = 0.0
        """Seconds of `seconds` this rank spent waiting for its next batch."""
        self.steps: list[list[float]] = []
        """[step, loss, lr] per optimizer step: this rank's mean loss over the step's micro batches."""
        self._losses: list[torch.Tensor] = []
        self._first: tuple[int, int] | None = None
        self._queued: list[tuple] = []

    def add(self, loss: torch.Tensor, items: int, epoch: int, micro_batch: int) -> None:
        self._losses.append(loss.detach().reshape(1))
        self._first = self._first or (epoch, micro_batch)
        self.items += items

    def step_done(self, step: int, lr: float) -> None:
        losses = torch.cat(self._losses)
        done = None
        if losses.is_cuda:
            host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
            host.copy_(losses, non_blocking=True)
            losses, done = host, torch.cuda.Event()
            done.record()
        self._queued.append((step, lr, self._first, losses, done))
        self._losses, self._first = [], None

    def settle(self, keep: int) -> None:
        while len(self._queued) > keep:
            step, lr, (epoch, micro_batch), losses, done = self._queued.pop(0)
            if done is not None:
                done.synchronize()  # this step's copy only, not the work queued after it
            values = losses.tolist()
            for i, value in enumerate(values):
                if not math.isfinite(value):
                    self.on_bad(value, step, epoch, micro_batch + i)
            self.loss_sum += sum(values)
            self.micro_batches += len(values)
            self.steps.append([step, sum(values) / len(values), lr])

    def close(self, seconds: float, data_wait: float) -> None:
        """Before a report: every loss settled, and the window's length and data wait."""
        self.settle(keep=0)
        self.seconds, self.data_wait = seconds, data_wait


def skip_lone_allreduce(engine) -> None:
    """Without ZeRO, DeepSpeed all-reduces the gradients after each backward: it flattens them into
    buckets, all-reduces each bucket, divides it by the world size and copies it back. With one
    rank that changes no value (a sum over one rank, divided by 1) but took about a tenth of a
    1-worker digits CNN run's wall time on 2 cores (bench/RESULTS.md), so one rank skips it."""
    if dist.get_world_size() == 1 and not engine.zero_optimization():
        engine.enable_backward_allreduce = False


class _Stopwatch:
    """The time a loop spends waiting on an iterator for its next item."""

    def __init__(self):
        self.seconds = 0.0

    def around(self, items):
        items = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield item

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _diverged(value: float, step: int, epoch: int, micro_batch: int, lr_path: str, lr: float):
    raise FloatingPointError(f"training diverged: the loss is {value} at step {step} (epoch {epoch + 1}, micro batch "
                             f"{micro_batch + 1}); lower {lr_path} (now {lr:g}) or set train.grad_clip")


def _model_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float features in `dtype` (the training precision, or fp32 for the frozen teacher); token ids stay integers."""
    return x.to(dtype) if x.is_floating_point() else x


def _finite_everywhere(loss: torch.Tensor, device) -> bool:
    """Whether the loss is finite on every rank: all ranks must agree before skipping a batch or
    stopping, or the ones that carry on would wait forever in the next collective."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _loss(distill: Distillation | None, device, user_loss: str | None = None):
    """loss(logits, targets, batch, inputs): cross-entropy for a teacher (or the user's `model.loss`,
    given the logits and targets); for a student, the distillation loss against the frozen teacher
    run here (`live`) or its outputs stored with the rows (`precompute`: all logits of a
    classifier, the top k per token of a language model)."""
    if distill is None and user_loss is not None:
        from trainers.models.python import import_path

        loss = import_path(user_loss, "loss")
        return lambda logits, y, batch, x: loss(logits, y)
    if distill is None:
        return lambda logits, y, batch, x: F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE)
    kd = partial(distillation_loss, temperature=distill.temperature, alpha=distill.alpha)
    if distill.teacher_outputs == "precompute":
        topk = partial(topk_distillation_loss, temperature=distill.temperature, alpha=distill.alpha)

        def stored(logits, y, batch, x):
            if TOPK_VALUES in batch:
                return topk(logits.flatten(0, -2), batch[TOPK_VALUES].flatten(0, -2), batch[TOPK_INDICES].flatten(0, -2),
                            y.flatten())
            return kd(logits, batch[LOGITS].float(), y)

        return stored
    teacher, _ = load_model_dir(local_dir(distill.teacher_dir))  # a URI run: the teacher is read from there
    teacher = teacher.to(device).requires_grad_(False)
    return lambda logits, y, batch, x: kd(logits.flatten(0, -2),
                                          teacher(_model_input(x, torch.float32), **model_kwargs(batch)).flatten(0, -2),
                                          y.flatten())


def _checkpoint(engine, config: WorkerConfig, spec: dict, rank: int, window: _Window, val_shard, dtype, position: dict,
                startup: dict | None = None) -> None:
    """Validate, then save and report a checkpoint from every rank (each holds its own optimizer shard).
    `startup` (the worker's start-up times) goes with the first report after the worker started."""
    metrics = _validate(engine, val_shard, dtype, config.train.micro_batch_size, config.data)
    totals = _all_reduce_sum(torch.tensor([window.loss_sum, window.micro_batches, window.items, window.data_wait],
                                          dtype=torch.float64), engine.device)
    lm = config.data["task"] == "lm"
    metrics.update(epoch=position["epoch"] + position["micro_batch"] / config.micro_batches_per_epoch, step=position["step"],
                   lr=float(engine.get_lr()[0]),
                   skipped_batches=window.skipped,  # the same on every rank: they skip together
                   # Per step since the last report, for TensorBoard/MLflow (rank 0's is the one kept).
                   step_log=window.steps)
    if totals[1] > 0:  # a report with no training since the last one (an adopted final checkpoint) has neither
        metrics.update(train_loss=totals[0] / totals[1],
                       **{"tokens_per_s" if lm else "samples_per_s": totals[2] / max(window.seconds, 1e-9)},
                       # The mean over ranks: how much of the window the data pipeline kept them waiting.
                       data_wait_s=totals[3] / dist.get_world_size())
    if startup and "reported" not in startup:
        metrics["startup"] = dict(startup)
        startup["reported"] = True
    if lm:
        metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 50.0))
    if engine.device.type == "cuda":
        # The most GPU memory any rank's tensors have taken since its process started.
        peak = torch.tensor([torch.cuda.max_memory_allocated(engine.device) / 2**20], dtype=torch.float64)
        metrics["gpu_memory_peak_mb"] = _all_reduce_max(peak, engine.device)[0]
    adapters = bool(config.model.lora)
    # A collective under ZeRO-3: every rank takes part. LoRA: the adapters alone (the rest is the base).
    state_dict = _full_state_dict(engine, rank, trainable_only=adapters)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state={"position": position},
                               exclude_frozen_parameters=adapters)
        _fault(config, rank, position["step"], "save:deepspeed")
        torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
        if rank == 0:
            save_model_dir(directory, state_dict, spec, engine.module)
            # Where in training this checkpoint is, readable without DeepSpeed (a sweep names the trial).
            (directory / POSITION).write_text(json.dumps({"trial": config.trial, **position}))
        _fault(config, rank, position["step"], "save")
        # Ray Train registers the checkpoint only once every rank has uploaded its part: a worker
        # that dies while saving leaves the previous checkpoint as the latest.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _load_state(engine, directory: Path, rank: int, adapters_only: bool = False) -> dict:
    # A LoRA checkpoint holds no frozen weight: the base model built them as they were.
    _, client_state = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                             load_module_strict=not adapters_only)
    rng = torch.load(directory / f"rng_rank{rank}.pt", weights_only=True)  # tensors: nothing to unpickle
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return dict(client_state["position"])


def _apply_optimizer_values(engine, deepspeed: dict) -> None:
    """Loading a checkpoint restores the optimizer's hyperparameters with its state; a PBT trial
    continuing another trial's checkpoint trains with its own: the lr its schedule gives at the
    loaded step (the schedule's state is only its step count), its weight decay and betas, and its
    gradient clipping (ZeRO-1/2's optimizer and DeepSpeed's fp16 and bf16 wrappers restore the
    clipping saved in the checkpoint; ZeRO-3 and fp32 ZeRO-0 read the config's)."""
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = deepspeed.get("gradient_clipping", 0.0)
    params = deepspeed.get("optimizer", {}).get("params", {})
    groups = engine.optimizer.param_groups
    scheduler = engine.lr_scheduler
    lrs = scheduler.get_lr() if scheduler is not None and hasattr(scheduler, "get_lr") else [params.get("lr")] * len(groups)
    for group, lr in zip(groups, lrs):
        if lr is not None:
            group["lr"] = lr
        for key in ("weight_decay", "betas", "eps"):
            if key in params:
                group[key] = tuple(params[key]) if key == "betas" else params[key]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


@torch.no_grad()
def _validate(engine, shard, dtype, batch_size: int, meta: dict) -> dict:
    engine.eval()
    # Summed on the device: no host sync per batch, one read-back after the all-reduce.
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=engine.device):
        x, y = model_batch(batch, meta)
        logits = engine(_model_input(x, dtype), **model_kwargs(batch)).float().flatten(0, -2)
        y = y.flatten()
        counted = y != IGNORE  # instruction data: the responses' tokens only
        sums[0] += F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE)
        sums[1] += ((logits.argmax(-1) == y) & counted).sum()
        sums[2] += counted.sum()
    loss, correct, count = _all_reduce_sum(sums, engine.device)
    return {"val_loss": loss / count, "val_accuracy": correct / count, "val_rows": int(count)}


def _all_reduce_sum(values: torch.Tensor, device) -> list[float]:
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu().tolist()


def _all_reduce_max(values: torch.Tensor, device) -> list[float]:
    values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.cpu().tolist()


def _full_state_dict(engine, rank: int, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model's weights in fp32 on rank 0 (None elsewhere), a tensor shared by two names
    (a tied LM head) under its first; `trainable_only`: the parameters that train (LoRA's
    adapters). Under ZeRO-3 each rank holds only a slice of every parameter: they are gathered
    one at a time, a collective every rank must call, and only rank 0 copies them, so no rank
    ever holds more than one whole parameter beyond the copy."""
    import deepspeed

    partitioned = engine.zero_optimization_partition_weights()
    if partitioned:
        # Validation's forward passes leave the parameters ZeRO-3 prefetched for a backward that
        # never came in flight, and gathering one of those fails ("Cannot partition a param in
        # flight", seen on a GPU): wait for them and release every parameter first.
        engine.empty_partition_cache()
    weights, seen = {}, set()
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        if id(tensor) in seen or (trainable_only and not tensor.requires_grad):
            continue
        seen.add(id(tensor))
        if partitioned and hasattr(tensor, "ds_id"):
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if rank == 0:
                    weights[name] = tensor.detach().float().cpu().clone()
        elif rank == 0:
            weights[name] = tensor.detach().float().cpu().clone()
    return weights if rank == 0 else None
