"""Driver side of one training run: the TorchTrainer that runs `train_loop_per_worker`, and the
pick of its best checkpoint. Used by the train and distill stages and by every sweep trial."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import ray.data
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.raycompat import PolledTorchTrainer, slot_name, worker_group_start_timed_out
from cluster.remote import is_uri, to_uri
from cluster.resources import describe, missing_resources, worker_group_demand
from runconfig.schema import TrainConfig, metric_mode
from trainers.loop import train_loop_per_worker
from trainers.worker import WorkerConfig


# Ray Train's poll interval (cluster.raycompat, 1): a run's end, and a report made before the one ahead
# of it was taken, wait for the next poll; but each poll is an actor call on every rank, which comes out
# of training where the ranks fill the CPUs. So runs whose reports come often poll fast, others slowly
# (bench/RESULTS.md, 2026-12-02, "Ray Train's poll interval chosen per run"). One the user set wins.
FAST_POLL_S, SLOW_POLL_S, FREQUENT_REPORTS = 0.1, 0.5, 50


def poll_interval_s(config: WorkerConfig) -> float:
    """Ray Train's poll interval for a run, from how often it reports: at each epoch's end, and
    every `train.checkpoint_every` steps."""
    steps = min(config.train.checkpoint_every or config.steps_per_epoch, config.steps_per_epoch)
    return FAST_POLL_S if steps * config.train.grad_accum_steps < FREQUENT_REPORTS else SLOW_POLL_S


class WorkerGroupUnplaceable(RuntimeError):
    """The worker group could not be (re)started: the cluster no longer holds it."""


IN_MEMORY_SHARE = 4
"""`data.in_memory: auto` holds the splits in memory when they and the shards every training run at once
cuts from them (`slot_shards`: a copy each) take at most 1/4 of the object store: up to 1/8 for one run."""


def load_splits(data_dir: Path | str, in_memory: bool | str = False, ingest_memory_mb: int | None = None,
                train_dir: Path | str | None = None, trainers: int = 1) -> dict[str, ray.data.Dataset]:
    """The cached train and val splits (the train split from `train_dir` where given: the teacher's
    outputs beside the rows), streamed to the workers as they train (see dataprep.stream).

    `in_memory` (`data.in_memory`): True reads them once into the object store before training,
    so that no epoch waits for read tasks to start over the files; `auto` does so when they are
    small (`hold_in_memory`) against the object store, counting the shards that `trainers` training
    runs at once (a sweep's concurrent trials) cut from them."""
    from dataprep.stream import held_split, split_bytes, stream_split

    folders = {"train": train_dir or data_dir, "val": data_dir}
    if in_memory == "auto":
        size = sum(split_bytes(folder, split) for split, folder in folders.items())
        store = ray.cluster_resources().get("object_store_memory", 0)
        in_memory = hold_in_memory(size, store, ingest_memory_mb, trainers)
    read = held_split if in_memory else stream_split
    return {split: read(folder, split) for split, folder in folders.items()}


def hold_in_memory(size: int, store_bytes: float, ingest_memory_mb: int | None, trainers: int = 1) -> bool:
    """`data.in_memory: auto`: whether splits of `size` bytes are held in the object store: when
    they and a copy for each of `trainers` training runs at once (their rank shards) take at most
    1/IN_MEMORY_SHARE of it, and the splits no more than `data.ingest_memory_mb` where set."""
    budget = store_bytes / IN_MEMORY_SHARE / (1 + trainers)
    if ingest_memory_mb is not None:
        budget = min(budget, ingest_memory_mb * 2**20)
    return size <= budget


def splits_in_memory(splits: dict[str, ray.data.Dataset]) -> bool:
    """Whether `load_splits` held these splits in memory."""
    from ray.data.dataset import MaterializedDataset

    return isinstance(splits["train"], MaterializedDataset)


def build_trainer(config: WorkerConfig, datasets: dict[str, ray.data.Dataset], storage_path: Path | str, name: str,
                  callbacks: Sequence = (), storage_filesystem=None, async_upload: bool | None = None) -> TorchTrainer:
    """A TorchTrainer whose workers run `config` over the splits from `load_splits`;
    `storage_filesystem`: the pyarrow filesystem `storage_path` is on, where Ray would not find it
    from the path itself. Checkpoints upload while training goes on where the storage is a URI
    (`async_upload` None), or as `async_upload` says."""
    from cluster.raycompat import SlotDataConfig

    train = config.train
    held = splits_in_memory(datasets)
    # preserve_order: each slot holds the same rows in the same order on every run, so a resumed run
    # (on any worker count) sees exactly the batches the uninterrupted one would have.
    options = _ingest_options(config.ingest_memory_mb)
    if held:
        shards = slot_shards(datasets, config.slots)
        data_config = SlotDataConfig(config.slots, None, options, datasets_to_split=[])
    else:  # the streamed train split, one dataset per slot (cluster.raycompat, 11); val split by rank
        shards = {slot_name("train", slot): datasets["train"] for slot in range(config.slots)} | {"val": datasets["val"]}
        data_config = SlotDataConfig(config.slots, "train", options, datasets_to_split=["val"])
    return PolledTorchTrainer(
        # The WorkerConfig is the one argument of the loop (Ray Train calls a function of none as is).
        partial(train_loop_per_worker, config.replace(
            rank_shards=held, async_upload=is_uri(storage_path) if async_upload is None else async_upload)),
        # A range: Ray Train starts as many as the cluster holds and resizes the group (restarting
        # it from the latest checkpoint) as nodes go and come.
        scaling_config=ScalingConfig(num_workers=train.worker_range if train.elastic else train.max_workers,
                                     elastic_resize_monitor_interval_s=train.resize_check_s, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker},
                                     placement_strategy=train.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=shards,
        dataset_config=data_config,
        run_config=RunConfig(
            name=name,
            storage_path=storage_uri(storage_path) if storage_filesystem is None else str(storage_path),
            storage_filesystem=storage_filesystem,
            # A worker group that cannot be placed again (a node left for good) times out after
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; without a limit Ray Train would retry forever.
            failure_config=FailureConfig(max_failures=train.max_failures,
                                         max_preemption_failures=train.max_preemption_failures,
                                         controller_failure_limit=max(train.max_failures, 0)),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints,
                                               checkpoint_score_attribute=config.metric,
                                               checkpoint_score_order=metric_mode(config.metric)),
            callbacks=list(callbacks),
        ),
        poll_s=poll_interval_s(config),
    )


def slot_shards(datasets: dict[str, ray.data.Dataset], slots: int) -> dict[str, ray.data.Dataset]:
    """Splits held in memory, cut once into equal shards, one per micro-batch slot: `train.0`,
    `train.1`, ... (`slot_name`): each rank reads its own slots' blocks, where a streaming split
    passes every block through a coordinator actor every rank waits on each epoch (8-9% of the GPT's
    throughput on 2 CPUs). Contiguous row ranges in file order, the remainder dropped, so every slot
    gets the same rows on every run and on any worker count (an exact resume). Sliced in the driver
    (`equal_slices`), not by `Dataset.split`, whose tasks wait for worker processes to start on a
    fresh Ray (1.8 s); so each shard is a copy (`hold_in_memory` counts them)."""
    shards = {}
    for name, dataset in datasets.items():
        tables = ray.get(dataset.to_arrow_refs())
        for slot, blocks in enumerate(equal_slices(tables, slots)):
            shards[slot_name(name, slot)] = ray.data.from_blocks(blocks)
    return shards


def equal_slices(tables: list, parts: int) -> list[list]:
    """`parts` runs of consecutive rows of `tables` (Arrow tables), each as long as the others and
    as long as possible (the remainder dropped): one zero-copy slice each of the tables joined
    (`concat_tables` joins their chunks without copying them). A run of no rows keeps the columns."""
    import pyarrow as pa

    joined = pa.concat_tables(tables, promote_options="default")
    length = joined.num_rows // parts
    return [[joined.slice(part * length, length)] for part in range(parts)]


def _ingest_options(memory_mb: int | None) -> ExecutionOptions:
    options = ExecutionOptions(preserve_order=True)
    if memory_mb is not None:
        # The object store memory Ray Data may fill ahead of the workers: what bounds ingestion's
        # footprint, whatever the dataset's size.
        options.resource_limits = options.resource_limits.copy(object_store_memory=memory_mb * 2**20)
    return options


def best_checkpoint(result, metric: str) -> tuple[str, dict]:
    """The kept checkpoint with the best `metric` (a local path, or a URI for storage at one), and
    the metrics reported with it."""
    pick = max if metric_mode(metric) == "max" else min
    checkpoint, metrics = pick(result.best_checkpoints, key=lambda pair: pair[1][metric])
    return to_uri(checkpoint.filesystem, checkpoint.path), metrics


def storage_uri(storage_path: Path | str) -> str:
    """Ray's storage_path: a URI as given, a local path made absolute."""
    return str(storage_path) if is_uri(storage_path) else str(Path(storage_path).resolve())


def fit(trainer: TorchTrainer, train: TrainConfig):
    """`trainer.fit()`, with a worker group that can no longer be placed (a node left and too
    little is left) reported as what it is, naming the missing resources."""
    import ray

    try:
        return trainer.fit()
    except Exception as exc:
        if not worker_group_start_timed_out(exc):
            raise
        demand = worker_group_demand(train.worker_range[0], train.cpus_per_worker, train.use_gpu)
        now = ray.cluster_resources()
        missing = missing_resources(now, demand)
        have = describe({k: now.get(k, 0.0) for k in demand})
        short = f"short by {describe(missing)}" if missing else "enough in total, but not free or not placeable together"
        raise WorkerGroupUnplaceable(
            f"train.workers: the worker group ({describe(demand)}) could not be started again; the cluster now has "
            f"{have} ({short}); a node may have left: add nodes or lower train.workers, then rerun with --resume"
        ) from None
