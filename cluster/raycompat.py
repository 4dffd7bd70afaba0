"""Every place raylaunch works around, or relies on, a behaviour of the installed Ray (2.60).

Each entry says what it does, why, and what in Ray it depends on; tests/test_raycompat.py has a test
per entry that fails when an upgraded Ray no longer behaves so (then the entry can change or go).
The classes that subclass Ray Train's are made on first use (`__getattr__` below): importing
Ray Train imports torch, seconds that starting Ray or `raylaunch submit` should not pay.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cluster.remote import to_uri

# ---------------------------------------------------------------------------------------------
# 1. Ray Train's poll interval, per run. Ray Train's controller polls its workers every
#    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), read from the environment `fit()` is called
#    in, and takes at most one report per rank per poll: runs that report every few steps wait on it
#    (trainers.fit.poll_interval_s chooses). Relies on: the controller reading that variable.

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextmanager
def polled_every(seconds: float) -> Iterator[None]:
    """The poll interval of the runs whose fit() is called inside. One the user set is left alone.
    Meant for one fit() at a time in a process (a run started alongside would share the interval)."""
    if TRAIN_POLL_ENV in os.environ:
        yield
        return
    os.environ[TRAIN_POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(TRAIN_POLL_ENV, None)


# ---------------------------------------------------------------------------------------------
# 2. Reports as they happen. Ray Train v2's `fit()` blocks until the run ends and hands the driver
#    nothing before; its UserCallback.after_report(run_context, metrics, checkpoint) runs in the
#    controller actor. A Ray queue carries each report from there to a thread of the driver (the
#    progress bar and metric logs; a sweep trial's reports to Tune); the queue's actor serves this
#    process's later runs too. Relies on: that hook and its arguments (metrics: one dict per rank).

CHECKPOINT_PATH = "checkpoint_path"
"""The key a `ReportStream` item holds the reported checkpoint's path under."""


class ReportStream:
    """Each report of a training run (rank 0's metrics, the checkpoint's path), as the run makes
    it, handed to `on_report` in a thread of this process. An error in `on_report` is raised when
    the run ends; reports keep being taken until then, or training would wait on the queue forever."""

    _DONE = "__done__"

    def __init__(self, on_report: Callable[[dict], None]):
        self.on_report, self.error, self.drained = on_report, None, False
        self.queue = _QUEUES.take()
        self.thread = threading.Thread(target=self._drain, name="report-stream", daemon=True)

    def callback(self):
        """The Ray Train UserCallback that feeds this stream: give it to the run's RunConfig."""
        return _train_classes()["_QueueReport"](self.queue)

    def __enter__(self) -> ReportStream:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.thread.is_alive():
            self.queue.put(self._DONE)  # after the last report: the thread handles everything first
            self.thread.join()
        if self.drained:  # empty: the next run of this process takes it
            _QUEUES.give_back(self.queue)
        else:
            self.queue.shutdown(force=True)
        if self.error is not None and exc_type is None:
            raise self.error

    def _drain(self) -> None:
        while (item := self.queue.get()) != self._DONE:
            if self.error is not None:
                continue
            try:
                self.on_report(item)
            except Exception as exc:  # raised in the run's thread when it ends
                self.error = exc
        self.drained = True


class _QueuePool:
    """The report queues of this process's finished runs, for its next runs. A queue is an actor,
    a process of its own: a new one for every run cost each stage and sweep trial a process start
    (about a second of CPU). Kept per Ray connection: a queue dies with the connection that made it."""

    def __init__(self):
        self.lock, self.connection, self.idle = threading.Lock(), None, []

    @staticmethod
    def _connection() -> tuple[str, str]:
        import ray

        context = ray.get_runtime_context()
        return context.get_job_id(), context.get_node_id()

    def take(self):
        from ray.util.queue import Queue

        connection = self._connection()
        with self.lock:
            if connection != self.connection:
                self.connection, self.idle = connection, []
            if self.idle:
                return self.idle.pop()
        # On the driver's node: a queue on another node dies with it (a preempted spot node), and the
        # controller, whose report callback puts into it, fails the run; the driver's node going ends
        # the run anyway.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(connection[1], soft=False)
        return Queue(maxsize=1, actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def give_back(self, queue) -> None:
        try:
            connection = self._connection()
        except Exception:  # Ray is gone, and the queue with it
            return
        with self.lock:
            if connection == self.connection:
                self.idle.append(queue)


_QUEUES = _QueuePool()


# ---------------------------------------------------------------------------------------------
# 3. A worker group that can no longer be placed. Ray Train raises ControllerError wrapping
#    WorkerGroupStartupTimeoutError, a class Ray exports only from `ray.train.v2._internal`.
#    Relies on: that class's module and ControllerError.controller_failure.


def worker_group_start_timed_out(exc: BaseException) -> bool:
    """Whether `exc` (from `fit()`) says the worker group could not be started in time."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    return isinstance(exc, ControllerError) and isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError)


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints Ray Train registered. A driver killed while its workers upload a checkpoint leaves
#    a folder Ray Train never registered and never reads; a resume removes it. The registered ones
#    are listed only in the checkpoint manager's snapshot, a private file of Ray Train's.
#    Relies on: its name and form ({"checkpoint_results": [{"checkpoint_dir_name": ...}], ...}).

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_checkpoints(snapshot: str) -> set[str] | None:
    """The checkpoint folders a snapshot lists. None where it cannot be read as the form it had when
    this was written, or lists none: then no folder can be told unregistered, and none may be deleted."""
    try:
        data = json.loads(snapshot)
    except json.JSONDecodeError:
        return None
    results = data.get("checkpoint_results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not results:
        return None
    latest = data.get("latest_checkpoint_result")
    names = set()
    for result in results + ([latest] if latest else []):
        name = result.get("checkpoint_dir_name") if isinstance(result, dict) else None
        if not isinstance(name, str) or not name.startswith("checkpoint_"):
            return None
        names.add(name)
    return names


def latest_checkpoint_metrics(snapshot: str) -> dict:
    """The metrics reported with the latest checkpoint a snapshot lists ({} where it lists none)."""
    return (json.loads(snapshot).get("latest_checkpoint_result") or {}).get("metrics") or {}


# ---------------------------------------------------------------------------------------------
# 5. A rank's held shard, read once. Each pass over a Ray Data shard starts a new execution of its
#    plan: for the digits (19 batches an epoch) 30-60 ms a pass, more than the CNN's training between
#    passes (bench/RESULTS.md). `HeldShard` takes the same `iter_torch_batches` arguments and gives
#    the same batches as Ray Data's iterator. Relies on: that iterator's arguments and its batches
#    (whole blocks with batch_size=None, in block order).


class HeldShard:
    """A rank's own shard of a split held in memory (`trainers.fit.rank_shards`), read from the
    object store into tensors in this process once; every pass then slices those tensors. A shuffled
    pass is a full permutation of the shard drawn from `local_shuffle_seed` (Ray Data's buffer of
    `local_shuffle_buffer_size` rows mixes rows only within the buffer)."""

    def __init__(self, shard):
        import torch

        blocks = list(shard.iter_torch_batches(batch_size=None, device="cpu"))  # whole blocks, file order
        self.columns = {name: torch.cat([block[name] for block in blocks]) for name in (blocks[0] if blocks else {})}
        self.rows = len(next(iter(self.columns.values()))) if self.columns else 0

    def iter_torch_batches(self, *, batch_size: int, device, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                           pin_memory: bool = False):
        import torch

        if local_shuffle_buffer_size is None:
            order = torch.arange(self.rows)
        else:  # the loop always seeds its shuffle (train.seed and the epoch)
            order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(local_shuffle_seed))
        stop = self.rows - self.rows % batch_size if drop_last else self.rows
        for start in range(0, stop, batch_size):
            rows = order[start:start + batch_size]
            batch = {name: column[rows] for name, column in self.columns.items()}
            if pin_memory:
                batch = {name: tensor.pin_memory() for name, tensor in batch.items()}
            yield {name: tensor.to(device, non_blocking=pin_memory) for name, tensor in batch.items()}


# ---------------------------------------------------------------------------------------------
# 6. Ray Data while preprocessing. A DataError raised in a map task reaches the driver as itself,
#    not as "UDF failed to process a data block" keeping only its text; and the per-operator
#    resource reservations, which ran one task at a time on 2 CPUs for the first 1.5 s (20k images:
#    4.3 s with them, 3.3 s without), are off: preprocessing has the cluster to itself.
#    Relies on: the DataContext fields raise_original_map_exception and op_resource_reservation_enabled.

PREPROCESSING_CONTEXT = {"raise_original_map_exception": True, "op_resource_reservation_enabled": False}


@contextmanager
def preprocessing_context() -> Iterator[None]:
    """Ray Data's context set as above for what runs inside, then restored."""
    import ray.data

    context = ray.data.DataContext.get_current()
    before = {name: getattr(context, name) for name in PREPROCESSING_CONTEXT}
    for name, value in PREPROCESSING_CONTEXT.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(context, name, value)


# ---------------------------------------------------------------------------------------------
# 7. An embedded Ray's system config (a joined cluster keeps its own).
# - prestart_worker_first_driver: Ray prestarts idle worker processes for the first driver, up to
#   one a CPU, with no runtime_env. Every task and actor of a raylaunch run carries one
#   (`cluster.session.worker_env`), so none of them can run in those processes: they would sit idle
#   for the whole run, each waking 100 times a second, on the cores the training ranks use.
# - idle_worker_killing_time_threshold_ms: while every CPU is leased, Ray ends a task worker after 1 s
#   idle, and the next task starts a new process (1.5-2 s of CPU to import Ray, pyarrow and the
#   task's modules again). Kept for 60 s, an idle worker serves the next operator and dataset.
# Relies on: both keys in Ray's system config (ray.init refuses unknown ones).

EMBEDDED_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "idle_worker_killing_time_threshold_ms": 60_000}


# ---------------------------------------------------------------------------------------------
# 8. Environment variables of a job's workers, for Ray Train.
# - RAY_API_SERVER_ADDRESS: Ray Train v2's placement-group cleaner asks the state API whether the
#   run's controller is alive without an address, so Ray looks for running GCS processes on its
#   machine; with a second Ray instance there its monitor thread dies and worker groups' placement
#   groups are never removed (the next trainer waits forever for CPUs). Given the dashboard of the
#   embedded Ray, it asks the right cluster.
# - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER: Ray Train starts a preemption watcher actor per run, for
#   nodes a cloud autoscaler drains; an embedded Ray is this machine alone, and the actor's process
#   cost about 2 s of each run's start on 2 cores. Off unless the user sets it.
# Relies on: Ray Train reading both.

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def embedded_worker_env(dashboard_port: int) -> dict[str, str]:
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
            PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0")}


# ---------------------------------------------------------------------------------------------
# 9. A quiet console. Tune's default console reporter prints an experiment banner even at
#    verbose=0; the legacy reporter, chosen by RAY_AIR_NEW_OUTPUT=0, honours verbose=0. The
#    libraries' Future/Deprecation warnings and Ray's, DeepSpeed's, torchao's and torch's
#    UserWarnings are ignored: raylaunch prints its own line per stage.
#    Relies on: Tune reading RAY_AIR_NEW_OUTPUT.

TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def quiet_libraries() -> None:
    os.environ[TUNE_OUTPUT_ENV] = "0"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(ray|deepspeed|torchao|torch)\b")


# ---------------------------------------------------------------------------------------------
# 10. Ctrl-C in a sweep. Tune catches SIGINT itself: it stops the trials as if they had ended
#     (TERMINATED) and returns from fit(), so a sweep the user interrupted would read as finished,
#     its trials "stopped early". Without its handler the KeyboardInterrupt reaches raylaunch, which
#     says the run was interrupted and that --resume continues it (from Tune's saved state).
#     Relies on: Tune reading TUNE_DISABLE_SIGINT_HANDLER when fit() starts.

TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


def sigint_reaches_caller() -> None:
    os.environ[TUNE_SIGINT_ENV] = "1"


# ---------------------------------------------------------------------------------------------
# 11. Micro-batch slots. A run's train split is cut into one stream per micro batch of an optimizer
#     step over all workers (workers x grad_accum_steps), so the rows of every step do not depend on
#     how many workers share it: a rank reads its share of the slots side by side and accumulates over
#     them, and a run resumed or resized on another worker count trains on the same batches. Ray
#     Train hands a rank one iterator per dataset name, so each slot is a dataset of its own
#     (`slot_name`); a streamed split becomes one `streaming_split` into all slots, made when the first
#     slot is asked for (each worker group's DatasetManager actor gets its own copy of the DataConfig,
#     so a restarted group splits afresh). Ray Data's split iterators wait for each other at the start
#     of every epoch, so one thread cannot read two of them in turn: `side_by_side` reads each in a
#     thread of its own. Relies on: DataConfig.configure, called per dataset name with a fresh
#     DataConfig per worker group, and streaming_split's epoch barrier.


def slot_name(split: str, slot: int) -> str:
    return f"{split}.{slot}"


_END = object()


def side_by_side(iterables: list) -> Iterator[list]:
    """One item of each iterable at a time, until one ends; with more than one, each is read in a
    thread of its own (an error there is raised here)."""
    if len(iterables) == 1:
        yield from ([item] for item in iterables[0])
        return
    import queue

    stop = threading.Event()
    queues = [queue.Queue(maxsize=2) for _ in iterables]

    def put(q, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def read(iterable, q) -> None:
        try:
            for item in iterable:
                if not put(q, item):
                    return
            put(q, _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            put(q, exc)

    threads = [threading.Thread(target=read, args=pair, daemon=True) for pair in zip(iterables, queues)]
    for thread in threads:
        thread.start()
    try:
        while True:
            items = [q.get() for q in queues]
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            if any(item is _END for item in items):
                return
            yield items
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# 12. Checkpoint uploads that retry. Ray Train uploads a reported checkpoint once (in the worker, or
#     in a thread of it with CheckpointUploadMode.ASYNC) and fails the run when that fails: an object
#     store's passing error would end a long run. `retrying_upload` is a `checkpoint_upload_fn` that
#     copies with Ray Train's own code, again after a pause where it fails, and then fails naming the
#     checkpoint (Ray Train registers it only once every rank's part arrived: the one before stays
#     the latest). Relies on: report's checkpoint_upload_fn, and the worker's StorageContext
#     (`ray.train.get_context().get_storage()`, a DeveloperAPI) and its persist_current_checkpoint.

UPLOAD_ATTEMPTS, UPLOAD_BACKOFF_S = 3, 1.0


class CheckpointUploadError(RuntimeError):
    """A checkpoint that could not be uploaded, after every attempt."""


def retrying_upload(what: str, attempts: int = UPLOAD_ATTEMPTS, backoff_s: float = UPLOAD_BACKOFF_S) -> Callable:
    """A `checkpoint_upload_fn` for the checkpoint `what` names ("the checkpoint at step 6")."""
    import shutil
    import time

    def upload(checkpoint, dir_name: str):
        import ray.train

        storage = ray.train.get_context().get_storage()
        for attempt in range(1, attempts + 1):
            try:
                return storage.persist_current_checkpoint(checkpoint, dir_name)
            except Exception as exc:  # pyarrow raises OSError and ArrowException kinds by filesystem
                if attempt == attempts:
                    shutil.rmtree(checkpoint.path, ignore_errors=True)  # Ray deletes it only once uploaded
                    target = to_uri(storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name))
                    reason = " ".join(str(exc).split())[:300]
                    raise CheckpointUploadError(
                        f"{what}: uploading it to {target} failed {attempts} times ({reason}); the checkpoint before "
                        f"it stays the latest, and --resume continues from there") from None
                time.sleep(backoff_s * attempt)

    return upload


# ---------------------------------------------------------------------------------------------
# 13. How far a lost worker group got. A group restarted from a checkpoint (a failure, a preemption,
#     a resize) cannot tell how many steps the one before trained past it: those steps are lost.
#     Rank 0 keeps its latest step in the GCS's key-value store, written by a thread of its own (the
#     training thread only sets a number), so the next group's rank 0 reads it back. Relies on:
#     ray.experimental.internal_kv (an internal API: a Ray without it gives no count, nothing more).


class ProgressBeacon:
    """The latest step rank 0 trained in a run (`key`), in the GCS, at most `every_s` late."""

    def __init__(self, key: str, every_s: float = 0.1):
        self.key, self.step, self._sent = key, None, None
        self._stop = threading.Event()
        threading.Thread(target=self._send, args=(every_s,), daemon=True).start()

    def _send(self, every_s: float) -> None:
        from ray.experimental import internal_kv

        while not self._stop.wait(every_s):
            step = self.step
            if step != self._sent:
                try:
                    internal_kv._internal_kv_put(self.key, str(step).encode(), overwrite=True)
                    self._sent = step
                except Exception:  # noqa: BLE001 - a count the summary shows, never worth a failed run
                    return

    def close(self) -> None:
        self._stop.set()

    @staticmethod
    def last(key: str) -> int | None:
        """The step a previous group of the run got to (None: none known)."""
        try:
            from ray.experimental import internal_kv

            value = internal_kv._internal_kv_get(key)
        except Exception:  # noqa: BLE001 - as above
            return None
        return int(value) if value else None


# 14. The driver's error channel. ray.init starts a thread in the driver that prints every error
#     message the GCS publishes for its job (or for all jobs), whatever log_to_driver says: a busy
#     node's "(raylet) WARNING: 10 PYTHON worker processes have been started ...", a killed
#     worker's notice. raylaunch states a failure in its own line, so without --verbose these are
#     dropped. Relies on: that thread (ray._private.worker.listen_error_messages) printing through
#     the module's print_to_stdstream with pid "raylet".


def drop_driver_error_messages() -> None:
    """Keep the GCS's published error messages off this driver's console."""
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "raylaunch_drops_errors", False):
        return

    def print_but_errors(data: dict, *args, **kwargs):
        if data.get("pid") != "raylet":
            printer(data, *args, **kwargs)

    print_but_errors.raylaunch_drops_errors = True
    ray_worker.print_to_stdstream = print_but_errors


# ---------------------------------------------------------------------------------------------
# The subclasses of Ray Train's classes (1, 2 and 11 above), made on first use.


@functools.cache
def _train_classes() -> dict[str, type]:
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.callback import UserCallback

    class PolledTorchTrainer(TorchTrainer):
        """A TorchTrainer whose controller polls every `poll_s` seconds (`polled_every`)."""

        def __init__(self, *args, poll_s: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.poll_s = poll_s

        def fit(self):
            with polled_every(self.poll_s):
                return super().fit()

    class _QueueReport(UserCallback):
        """Runs in the run's controller: hands each report to a `ReportStream` through its queue."""

        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            item = dict(metrics[0])
            if checkpoint is not None:
                item[CHECKPOINT_PATH] = to_uri(checkpoint.filesystem, checkpoint.path)
            self.queue.put(item)  # waits while the previous report is still being handled

    class SlotDataConfig(DataConfig):
        """Datasets for micro-batch slots (11 above): `streamed` names the split whose slots
        (`slot_name(streamed, k)` for k < `slots`) are one dataset streamed into `slots` parts, in
        the same order on every run; every other dataset as DataConfig splits it. Locality is off:
        it would send rows to the nodes their blocks are on, another cut on every run."""

        def __init__(self, slots: int, streamed: str | None, options, datasets_to_split: list[str]):
            super().__init__(datasets_to_split=datasets_to_split, execution_options=options,
                             enable_shard_locality=False)
            self.slots, self.streamed, self.options, self._parts = slots, streamed, options, None

        def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
            name, dataset = next(iter(datasets.items()))  # Ray Train v2 configures one at a time
            split, _, slot = name.rpartition(".")
            if len(datasets) != 1 or split != self.streamed or not slot.isdigit():
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            if self._parts is None:
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self.options
                self._parts = dataset.streaming_split(self.slots, equal=True)
            return [{name: self._parts[int(slot)]} for _ in range(world_size)]  # only its owner asks

    classes = {"PolledTorchTrainer": PolledTorchTrainer, "_QueueReport": _QueueReport, "SlotDataConfig": SlotDataConfig}
    for cls in classes.values():
        cls.__qualname__ = cls.__name__  # pickled by reference: `__getattr__` below finds them
    return classes


def __getattr__(name: str):
    if name in ("PolledTorchTrainer", "_QueueReport", "SlotDataConfig"):
        return _train_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
