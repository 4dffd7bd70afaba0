"""The per-worker training function Ray Train runs on every rank.

Everything a worker needs arrives in its `WorkerConfig` (built once on the driver by
`trainers.worker.worker_config`) and through `ray.train.get_dataset_shard`; everything it gives back
leaves through `ray.train.report`. The same loop trains a teacher (cross-entropy) and a student (distillation
loss against a frozen teacher), classifiers and language models alike: a batch is `features`
and `label`, and for a language model both are token blocks, the label shifted by one.

A checkpoint holds everything an exact resume needs: DeepSpeed's own checkpoint (weights,
optimizer and scheduler state, one optimizer shard per rank under ZeRO), every rank's RNG
states, and the position in the data (epoch, step in the epoch, worker count). Beside it, rank 0
writes the consolidated fp32 model (`model.safetensors` + `model.json`) that later stages load.
A step's rows are the same on any worker count (micro-batch slots: cluster.raycompat, 11), so a
run can continue on another one, its ZeRO state re-partitioned through a universal checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.raycompat import (PREEMPTION_WATCHER_ENV, HeldShard, ProgressBeacon, retrying_upload, side_by_side,
                               slot_name)
from cluster.remote import local_dir
from trainers import import_deepspeed
from dataprep import IGNORE
from trainers.batches import model_batch, model_kwargs
from trainers.distill import LOGITS, TOPK_INDICES, TOPK_VALUES, distillation_loss, topk_distillation_loss
from trainers.modeldir import load_model_dir, model_spec, save_model_dir
from trainers.models import build_model
from trainers.profiling import profiled_step
from trainers.syncaudit import sync_audit
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
    rank, world = context.get_world_rank(), context.get_world_size()
    # This rank's micro-batch slots: the same rows make up each step on any worker count.
    accum = config.slots // world
    slots = range(rank * accum, (rank + 1) * accum)
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

    checkpoint = ray.train.get_checkpoint()  # a restart after a failure, or `--resume`: continue exactly where it stopped
    adopted = checkpoint is None and config.start_from is not None
    if adopted:  # PBT: another trial's checkpoint, continued with this trial's (perturbed) values
        checkpoint = ray.train.Checkpoint(config.start_from)
    position = {"epoch": 0, "epoch_step": 0, "step": 0}
    # Rank 0's progress, for the next group to count what a lost one trained past its checkpoint.
    beacon_key = f"raylaunch-progress:{context.get_storage().experiment_fs_path}:{config.trial}"
    reached = ProgressBeacon.last(beacon_key) if rank == 0 else None
    with (checkpoint.as_directory() if checkpoint is not None else nullcontext()) as directory:
        saved = Path(directory) if directory is not None else None
        # Saved on another worker count: ZeRO's partitioned state is converted to DeepSpeed's
        # universal checkpoint, which DeepSpeed re-partitions as it loads.
        resharded = saved is not None and _saved_workers(saved) not in (None, world) and _partitioned(saved)
        ds_config = for_world(config.deepspeed, world, resharded)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        skip_lone_allreduce(engine)
        if saved is not None:
            # Every rank of a node names the same converted copy (a download's folder may differ).
            universal = f"{checkpoint.path}|{config.trial}" if resharded else None
            position = _load_state(engine, saved, rank, world, adapters_only=bool(config.model.lora),
                                   universal=universal, local_rank=context.get_local_rank())
            if adopted:
                _apply_optimizer_values(engine, config.deepspeed)
    startup["engine_ready"] = time.time()
    if checkpoint is not None and not adopted:  # restored: sent with the first report, as `startup` is
        startup["restored"] = {"step": position["step"], "workers": world, "saved_on": position.get("workers"),
                               "lost_steps": None if reached is None else max(reached - position["step"], 0)}
    beacon = ProgressBeacon(beacon_key) if rank == 0 else None
    dtype = DTYPES[train.precision]
    train_shards = [ray.train.get_dataset_shard(slot_name("train", slot)) for slot in slots]
    val_shards = ([ray.train.get_dataset_shard(slot_name("val", slot)) for slot in slots] if config.rank_shards
                  else [ray.train.get_dataset_shard("val")])
    if config.rank_shards:
        train_shards, val_shards = [HeldShard(s) for s in train_shards], [HeldShard(s) for s in val_shards]
    spec = model_spec(model_section, meta)

    per_epoch = config.steps_per_epoch
    every = train.checkpoint_every
    stall: dict = {}  # how long the last checkpoint held training up
    # Ray Train's preemption notices (a cloud draining a node): not on an embedded Ray, which turns its watcher off.
    watch_preemption = os.environ.get(PREEMPTION_WATCHER_ENV, "1") != "0"
    notice, noticed = None, False
    if adopted and position["epoch"] >= train.epochs:
        # PBT handed this trial another trial's checkpoint from the end of training: nothing is
        # left to train, but Tune must still hear that the trial is at its last epoch, with the
        # weights it now holds (else it ends reporting an earlier epoch, as if stopped early).
        _checkpoint(engine, config, spec, rank, _Window(None), val_shards, dtype, dict(position), stall)
    # A non-finite loss. `skip`: every rank must agree before dropping a micro batch, a collective
    # and a host sync per micro batch. `fail`: each rank checks its own losses as they are read
    # back (a rank that raises ends the run), a step late on an accelerator so that it never
    # waits for the step in flight; no checkpoint is taken before every loss is checked.
    skip_bad = train.on_nan == "skip"
    diverged = partial(_diverged, lr_path=config.lr_path, lr=train.lr)
    lag = 1 if engine.device.type == "cuda" else 0
    waiting = _Stopwatch()
    audit = sync_audit(config.sync_audit)
    for epoch in range(position["epoch"], train.epochs):
        engine.train()
        started, since_report = time.perf_counter(), _Window(diverged)
        skip = position["epoch_step"] if epoch == position["epoch"] else 0
        # On a GPU the batches are pinned: a copy from pageable memory waits for all the work queued
        # before it, which would stop the CPU queueing ahead.
        streams = [shard.iter_torch_batches(batch_size=train.micro_batch_size, drop_last=True,
                                            local_shuffle_buffer_size=max(config.shuffle_buffer, train.micro_batch_size),
                                            local_shuffle_seed=train.seed * 1000 + epoch, device=engine.device,
                                            pin_memory=engine.device.type == "cuda")
                   for shard in train_shards]
        # Every rank walks its slots whole (equal row counts: the same number of batches), trains
        # on the first `per_epoch` steps and, after a resume, passes over the ones already trained.
        for epoch_step, batches in enumerate(waiting.around(side_by_side(streams))):
            startup.setdefault("first_batch", time.time())
            if epoch_step < skip or epoch_step >= per_epoch:
                continue
            profiling = rank == 0 and config.profile_step == position["step"] + 1
            with (profiled_step(engine.device, since_report.profile) if profiling else nullcontext()), \
                    audit.step(len(slots)):
                for slot, batch in zip(slots, batches):
                    micro_batch = epoch_step * accum + slot - slots[0]  # this rank's count, for messages
                    if config.trace:
                        _trace(config.trace, rank, slot, epoch, epoch_step, batch)
                    x, y = model_batch(batch, meta, epoch)
                    x = _model_input(x, dtype)
                    loss = loss_fn(engine(x, **model_kwargs(batch)).float(), y, batch, x)
                    if skip_bad and not _finite_everywhere(loss, engine.device):
                        since_report.skipped += 1
                        continue  # every rank skips the same micro batch: the accumulation stays aligned
                    engine.backward(loss)
                    engine.step()
                    since_report.add(loss, y.numel(), epoch, micro_batch)
                if not since_report.pending:  # on_nan skip dropped every micro batch of the step: no update
                    continue
                position["step"] += 1
                if beacon is not None:
                    beacon.step = position["step"]
                since_report.step_done(position["step"], float(engine.get_lr()[0]))
                since_report.settle(keep=lag)
            startup.setdefault("first_step", time.time())
            _fault(config, rank, position["step"], "step")
            if config.step_pause_s:
                time.sleep(config.step_pause_s)
            last_step_of_epoch = epoch_step + 1 == per_epoch
            # A node of this group is being preempted: checkpoint now, uploaded before going on, then
            # wait for Ray Train to restart the group (steps trained meanwhile would be lost).
            notice = (ray.train.get_preemption_info() if watch_preemption and notice is None
                      and position["step"] % train.preemption_check_steps == 0 else notice)
            if (notice is not None and not noticed) or (every and position["step"] % every == 0 and not last_step_of_epoch):
                since_report.close(time.perf_counter() - started, waiting.take(), waiting.take_first())
                _checkpoint(engine, config, spec, rank, since_report, val_shards, dtype,
                            {"epoch": epoch, "epoch_step": epoch_step + 1, "step": position["step"]}, stall, startup,
                            preempted=notice if not noticed else None)
                started, since_report = time.perf_counter(), _Window(diverged)
                engine.train()
            if notice is not None and not noticed:
                noticed = True
                _await_restart(notice.deadline_ms)
        since_report.close(time.perf_counter() - started, waiting.take(), waiting.take_first())
        _checkpoint(engine, config, spec, rank, since_report, val_shards, dtype,
                    {"epoch": epoch + 1, "epoch_step": 0, "step": position["step"]}, stall, startup)
    if beacon is not None:
        beacon.close()
    audit.write(config.sync_audit, rank)
    audit.uninstall()


def _await_restart(deadline_ms: int | None, past_s: float = 30.0) -> None:
    """After a preemption checkpoint: wait for Ray Train to stop the group at the drain's deadline.
    Without a deadline, or where the group outlives it by `past_s` (the drain was called off),
    training goes on; every rank waits alike, so they go on together."""
    if deadline_ms is None:
        return
    until = deadline_ms / 1000 + past_s
    while time.time() < until:
        time.sleep(0.5)


def for_world(deepspeed: dict, world: int, universal: bool = False) -> dict:
    """The run's DeepSpeed JSON for a group of `world` ranks: the global and micro batch as set,
    the accumulation over this rank's share of the slots; `universal`: the checkpoint it loads is
    a universal one (saved on another worker count)."""
    global_batch, micro = deepspeed["train_batch_size"], deepspeed["train_micro_batch_size_per_gpu"]
    config = {**deepspeed, "gradient_accumulation_steps": global_batch // micro // world}
    if universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return config


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


def _fault(config: WorkerConfig, rank: int, step: int, where: str) -> None:
    """Fault injection for the failure tests (`WorkerConfig.fault`; the driver never sets it)."""
    fault = config.fault
    if fault and (fault.rank, fault.step, fault.where) == (rank, step, where) and not os.path.exists(fault.marker):
        Path(fault.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _trace(folder: str, rank: int, slot: int, epoch: int, epoch_step: int, batch: dict) -> None:
    """For the data tests: `WorkerConfig.trace` names a folder where each rank writes, as it trains on
    them, the keys of the rows of each micro batch with its slot and step in the epoch (one JSON
    line per micro batch, in order; a restarted worker group writes again from where it continues).
    The driver never sets it."""
    record = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "world": dist.get_world_size(),
              "slot": slot, "epoch": epoch, "epoch_step": epoch_step, "time": time.time(), "keys": batch["key"].tolist()}
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def step_time_spread(seconds: list[float]) -> dict:
    """This rank's step times since the last report: median, 90th percentile (nearest rank),
    slowest, and each step's, rounded to microseconds (bench/gpu_throughput.py reads them)."""
    if not seconds:
        return {}
    ordered = sorted(seconds)
    return {"step_time_p50_s": statistics.median(ordered), "step_time_p90_s": ordered[math.ceil(0.9 * len(ordered)) - 1],
            "step_time_max_s": ordered[-1], "step_seconds": [round(s, 6) for s in seconds]}


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
        self.step_seconds: list[float] = []
        """Wall seconds per optimizer step, from the last one's losses queued to this one's (on a GPU,
        where the CPU runs a step ahead, the device's pace once it is the bottleneck)."""
        self.profile: dict = {}
        """The summary of a profiled step in this window (`trainers.profiling`), if any."""
        self._last = time.perf_counter()
        self.epoch_start_wait: float | None = None
        self._losses: list[torch.Tensor] = []
        self._first: tuple[int, int] | None = None
        self._queued: list[tuple] = []

    def add(self, loss: torch.Tensor, items: int, epoch: int, micro_batch: int) -> None:
        self._losses.append(loss.detach().reshape(1))
        self._first = self._first or (epoch, micro_batch)
        self.items += items

    @property
    def pending(self) -> bool:
        """Whether this step trained on any micro batch (`add`) since the last `step_done`."""
        return bool(self._losses)

    def step_done(self, step: int, lr: float) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self._last = now
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

    def close(self, seconds: float, data_wait: float, epoch_start_wait: float | None = None) -> None:
        """Before a report: every loss settled, the window's length and data wait, and the wait for
        the first batch of an epoch that started in it (Ray Data starting the epoch's streams)."""
        self.settle(keep=0)
        self.seconds, self.data_wait, self.epoch_start_wait = seconds, data_wait, epoch_start_wait


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
        self.first: float | None = None
        """The wait for the first item of the latest `around` (an epoch's streams starting), until taken."""

    def around(self, items):
        items, first = iter(items), True
        while True:
            started = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                waited = time.perf_counter() - started
                self.seconds += waited
                if first:
                    self.first, first = waited, False
            yield item

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def take_first(self) -> float | None:
        first, self.first = self.first, None
        return first


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


def _checkpoint(engine, config: WorkerConfig, spec: dict, rank: int, window: _Window, val_shards: list, dtype,
                position: dict, stall: dict, startup: dict | None = None, preempted=None) -> None:
    """Validate, then save and report a checkpoint from every rank (each holds its own optimizer shard).
    `startup` (the worker's start-up times) goes with the first report after the worker started;
    `stall` holds how long the previous checkpoint kept training waiting (saving, and uploading unless
    the upload is asynchronous), sent with this one. `preempted`: Ray Train's notice this checkpoint
    answers (uploaded before the call returns: the node may be gone soon)."""
    position = {**position, "workers": dist.get_world_size()}  # a resume on another count re-partitions
    metrics = _validate(engine, val_shards, dtype, config.train.micro_batch_size, config.data)
    totals = _all_reduce_sum(torch.tensor([window.loss_sum, window.micro_batches, window.items, window.data_wait],
                                          dtype=torch.float64), engine.device)
    lm = config.data["task"] == "lm"
    metrics.update(epoch=position["epoch"] + position["epoch_step"] / config.steps_per_epoch, step=position["step"],
                   lr=float(engine.get_lr()[0]),
                   skipped_batches=window.skipped,  # the same on every rank: they skip together
                   # Per step since the last report, for TensorBoard/MLflow (rank 0's is the one kept).
                   step_log=window.steps)
    if totals[1] > 0:  # a report with no training since the last one (an adopted final checkpoint) has neither
        metrics.update(train_loss=totals[0] / totals[1],
                       **{"tokens_per_s" if lm else "samples_per_s": totals[2] / max(window.seconds, 1e-9)},
                       # The mean over ranks: how much of the window the data pipeline kept them waiting.
                       data_wait_s=totals[3] / dist.get_world_size())
    metrics["workers"] = dist.get_world_size()
    metrics.update(step_time_spread(window.step_seconds))
    if window.epoch_start_wait is not None:  # this rank's wait for its epoch's first batch
        metrics["epoch_start_wait_s"] = window.epoch_start_wait
    if window.profile:
        metrics["profile"] = window.profile
    if startup and "reported" not in startup:
        restored = startup.pop("restored", None)
        if restored is not None:
            metrics["restored"] = restored
        metrics["startup"] = dict(startup)
        startup["reported"] = True
    if lm:
        metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 50.0))
    if engine.device.type == "cuda":
        # The most GPU memory any rank's tensors have taken since its process started.
        peak = torch.tensor([torch.cuda.max_memory_allocated(engine.device) / 2**20], dtype=torch.float64)
        metrics["gpu_memory_peak_mb"] = _all_reduce_max(peak, engine.device)[0]
    adapters = bool(config.model.lora)
    if stall.get("seconds") is not None:  # the previous checkpoint's: this one's is known once it is saved
        metrics["checkpoint_stall_s"] = stall["seconds"]
    if preempted is not None:
        metrics["preemption"] = {"nodes": preempted.preempted_node_ids, "ranks": preempted.preempted_ranks,
                                 "deadline_ms": preempted.deadline_ms, "noticed_ms": int(time.time() * 1000)}
    started = time.perf_counter()
    # A collective under ZeRO-3: every rank takes part. LoRA: the adapters alone (the rest is the base).
    state_dict = _full_state_dict(engine, rank, trainable_only=adapters)
    directory = Path(tempfile.mkdtemp(prefix="raylaunch-checkpoint-"))  # Ray Train deletes it once uploaded
    try:
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
        # that dies while saving or uploading leaves the previous checkpoint as the latest. At a URI
        # the upload runs in a thread while training goes on; the run's end waits for the last one.
        mode = CheckpointUploadMode.ASYNC if config.async_upload and preempted is None else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=retrying_upload(f"the checkpoint at step {position['step']}"))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    stall["seconds"] = time.perf_counter() - started


def _load_state(engine, directory: Path, rank: int, world: int, adapters_only: bool = False,
                universal: str | None = None, local_rank: int = 0) -> dict:
    """Restore a checkpoint into `engine` and this rank's RNG; its position in the data. `universal`
    (a name for it): the checkpoint was saved on another worker count, and is converted first, once a node."""
    source = directory / DEEPSPEED_DIR
    converted = Path(tempfile.gettempdir()) / f"raylaunch-universal-{hashlib.sha1(str(universal).encode()).hexdigest()[:16]}"
    if universal:
        if local_rank == 0:
            _to_universal(source / DEEPSPEED_TAG, converted)
        dist.barrier()  # every node's copy converted
        source = converted
    # A LoRA checkpoint holds no frozen weight: the base model built them as they were.
    _, client_state = engine.load_checkpoint(str(source), tag=DEEPSPEED_TAG, load_module_strict=not adapters_only)
    if universal:
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(converted, ignore_errors=True)
    position = dict(client_state["position"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if position.get("workers", world) == world:
        rng = torch.load(rng_file, weights_only=True)  # tensors: nothing to unpickle
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # no saved stream is this rank's: a new one per rank and step (only dropout draws from it)
        torch.manual_seed(position["step"] * 1_000_003 + rank)
    return position


def _saved_workers(directory: Path) -> int | None:
    """The worker count a checkpoint was saved on (None: saved before raylaunch recorded it)."""
    position = directory / POSITION
    return json.loads(position.read_text()).get("workers") if position.exists() else None


def _partitioned(directory: Path) -> bool:
    """Whether a checkpoint's optimizer state is split across ranks (ZeRO 1-3, and DeepSpeed's bf16
    optimizer): ZeRO-0 keeps it whole in the model states every rank loads."""
    return any((directory / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*optim_states.pt"))


def _to_universal(tag_dir: Path, target: Path) -> None:
    """DeepSpeed's universal checkpoint of a checkpoint's `tag_dir`, written to `target`/DEEPSPEED_TAG
    (its converter, in this process: a process pool would fork a worker that may hold a GPU)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as convert

    shutil.rmtree(target, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(target / DEEPSPEED_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # raylaunch's checkpoints do not carry the universal-checkpoint marker
                              # Megatron-style clients add; a plain data-parallel model needs none.
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert(args)


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
def _validate(engine, shards: list, dtype, batch_size: int, meta: dict) -> dict:
    engine.eval()
    # Summed on the device: no host sync per batch, one read-back after the all-reduce.
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
    for shard in shards:
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
