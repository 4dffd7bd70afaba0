"""What a training run's workers receive: one `WorkerConfig`, built on the driver by `worker_config`.

The train and distill stages and every sweep trial build it from the resolved config; a sweep,
a distillation and the tests say more through its fields (`replace`), never through extra keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dataprep.meta import DataMeta
from runconfig.resolved import ResolvedConfig
from runconfig.schema import ModelConfig, TrainConfig
from trainers.deepspeed_config import deepspeed_config


@dataclass(frozen=True)
class Distillation:
    """A student's run: the frozen teacher's model directory and the distillation loss's settings."""

    teacher_dir: str
    """A local path, or a URI (a URI run's workers read the teacher from there)."""
    temperature: float
    alpha: float
    teacher_outputs: str
    """`live`: every worker runs the teacher; `precompute`: its outputs are columns of the train split."""


@dataclass(frozen=True)
class Fault:
    """For the failure tests only: SIGKILL rank `rank` once (`marker` records that it happened)
    after optimizer step `step` (`where="step"`), or while saving that step's checkpoint: once
    DeepSpeed has written its state (`"save:deepspeed"`), or once every file is written and before
    the upload (`"save"`)."""

    rank: int
    step: int
    where: str
    marker: str


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `trainers.loop.train_loop_per_worker` gets, resolved on the driver."""

    model: ModelConfig
    """The model this run trains: `model`, or for a distillation `distill.student`."""
    train: TrainConfig
    """The train section; a distillation's own epochs and lr (`distill.epochs`, `distill.lr`) applied."""
    data: DataMeta
    deepspeed: dict
    """The DeepSpeed JSON, the user's merged in."""
    steps_per_epoch: int
    """Optimizer steps per epoch, the same on every rank."""
    metric: str
    """The validation metric the best checkpoint is chosen by (`tune.metric`)."""
    lr_path: str
    """The config path of this run's learning rate, for the divergence message."""
    ingest_memory_mb: int | None
    shuffle_buffer: int
    distill: Distillation | None = None
    rank_shards: bool = False
    """The splits are held in memory, cut into one shard a slot (`trainers.fit.slot_shards`); else streamed."""
    trial: str | None = None
    """The sweep trial this run is (written into each checkpoint's position.json)."""
    start_from: str | None = None
    """PBT: another trial's checkpoint this one continues, with its own hyperparameters."""
    fault: Fault | None = None
    trace: str | None = None
    """For the data tests only: a folder each rank writes the keys of every micro batch to, in order."""
    async_upload: bool = False
    """Upload each checkpoint in a thread while training goes on (`trainers.fit.build_trainer`: at a URI)."""
    step_pause_s: float = 0.0
    """For the elastic tests only: seconds each rank sleeps after each step (a run long enough to resize)."""
    sync_audit: str | None = None
    """For the sync test and the GPU bench: a folder each rank writes its count of the calls in its
    steps that would sync a GPU to (`trainers.syncaudit`)."""
    profile_step: int | None = None
    """For the GPU bench: rank 0 runs this optimizer step under torch.profiler and sends the summary
    with the next report (`profile`: `trainers.profiling`)."""

    @property
    def slots(self) -> int:
        """Micro batches per optimizer step over all workers: the train split is cut into as many
        streams (cluster.raycompat, 11), and a rank of a group of `world` accumulates over
        `slots // world` of them, so a step's rows are the same on every worker count."""
        return self.train.slots

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.train.epochs

    def replace(self, **changes) -> WorkerConfig:
        return dataclasses.replace(self, **changes)


def steps_per_epoch(train: TrainConfig, train_rows: int) -> int:
    """Optimizer steps per epoch. Every rank gets the same rows (an equal split drops the
    remainder), and only whole optimizer steps are taken, so all ranks agree on the count."""
    return train_rows // train.slots // train.micro_batch_size


def hidden_size(model: ModelConfig, teacher: ModelConfig | None = None) -> int:
    if model.type == "hf":
        from trainers.models.hf import WIDTHS, hidden_size

        if model.overrides is not None:  # a student derived from `teacher`: its width, unless overridden
            given = [model.overrides[name] for name in WIDTHS if name in model.overrides]
            return int(given[0]) if given else hidden_size(teacher.model_dump(mode="json"))
        return hidden_size(model.model_dump(mode="json"))
    return model.d_model if model.type == "gpt" else model.width


def worker_config(resolved: ResolvedConfig, data: DataMeta, teacher_dir: str | None = None) -> WorkerConfig:
    """The one place a training run's `WorkerConfig` is built. With `teacher_dir` it trains
    `distill.student` against that teacher."""
    run = resolved.run
    train, model, distill, lr_path = run.train, run.model, None, "train.lr"
    if teacher_dir is not None:
        # A text student reads the teacher's rows: its sequences are the teacher's length.
        model = run.distill.student
        if model.type in ("gpt", "hf"):
            model = model.model_copy(update={"seq_len": run.model.seq_len})
        train = train.model_copy(update={"epochs": run.distill.epochs or train.epochs, "lr": run.distill.lr or train.lr})
        lr_path = "distill.lr" if run.distill.lr else lr_path
        distill = Distillation(teacher_dir, run.distill.temperature, run.distill.alpha, run.distill.teacher_outputs)
    per_epoch = steps_per_epoch(train, data["rows"]["train"])
    if per_epoch < 1:
        raise ValueError(f"train.micro_batch_size: {data['rows']['train']} train rows make no full optimizer step of "
                         f"{train.slots} micro batches of {train.micro_batch_size} rows")
    return WorkerConfig(
        model=model, train=train, data=data, distill=distill, metric=run.tune.metric, lr_path=lr_path,
        steps_per_epoch=per_epoch, ingest_memory_mb=run.data.ingest_memory_mb, shuffle_buffer=run.data.shuffle_buffer,
        deepspeed=deepspeed_config(train, hidden_size(model, run.model), per_epoch * train.epochs, resolved.deepspeed_user,
                                   keep_grad_norm="train.grad_clip" in run.tune.space))
