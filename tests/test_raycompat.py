"""What raylaunch relies on in the installed Ray (cluster.raycompat): one test per entry there, each
failing when an upgraded Ray no longer behaves as the entry needs. The entry's number is in the name."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cluster import raycompat
from cluster.raycompat import (CHECKPOINT_PATH, CHECKPOINT_SNAPSHOT, EMBEDDED_SYSTEM_CONFIG, PREEMPTION_WATCHER_ENV,
                               PREPROCESSING_CONTEXT, TRAIN_POLL_ENV, TUNE_OUTPUT_ENV, HeldShard, ReportStream,
                               latest_checkpoint_metrics, preprocessing_context, registered_checkpoints,
                               worker_group_start_timed_out)
from conftest import skip_or_fail
from trainers.fit import SLOW_POLL_S


def test_1_2_4_a_run_polls_at_its_interval_streams_its_reports_and_lists_its_checkpoints(ray_cluster, tmp_path):
    """One real run: (1) its controller gets the interval of the environment fit() was called in,
    and the caller's environment is restored; (2) each report reaches the driver as it is made;
    (4) Ray Train's checkpoint snapshot lists the checkpoint folders it registered, and the metrics
    of the latest."""
    import ray.train
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig

    if TRAIN_POLL_ENV in os.environ:
        skip_or_fail(f"{TRAIN_POLL_ENV} is set in this environment")

    def train():
        for step in (1, 2, 3):
            with tempfile.TemporaryDirectory() as directory:
                ray.train.report({"step": step, "poll": os.environ.get(TRAIN_POLL_ENV)},
                                 checkpoint=ray.train.Checkpoint.from_directory(directory))

    seen = []
    with ReportStream(seen.append) as stream:
        trainer = raycompat.PolledTorchTrainer(
            train, scaling_config=ScalingConfig(num_workers=1), poll_s=SLOW_POLL_S,
            run_config=RunConfig(name="compat", storage_path=str(tmp_path), callbacks=[stream.callback()],
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        result = trainer.fit()
    assert result.metrics["poll"] == str(SLOW_POLL_S) and TRAIN_POLL_ENV not in os.environ
    assert [item["step"] for item in seen] == [1, 2, 3]

    snapshot = (tmp_path / "compat" / CHECKPOINT_SNAPSHOT).read_text()
    on_disk = {p.name for p in (tmp_path / "compat").glob("checkpoint_*") if p.is_dir()}
    # The two kept (num_to_keep), the last two reported.
    assert registered_checkpoints(snapshot) == on_disk == {Path(item[CHECKPOINT_PATH]).name for item in seen[1:]}
    assert latest_checkpoint_metrics(snapshot)["step"] == 3


def test_2_a_finished_runs_report_queue_serves_the_next_run_and_runs_at_once_get_their_own(ray_cluster):
    """The queue a run's controller puts its reports on is an actor: a finished run's (drained, so
    empty) serves this process's next run instead of starting a process for every run."""
    seen = []
    with ReportStream(seen.append) as first:
        first.queue.put({"step": 1})  # what the run's controller does with each report
        with ReportStream(seen.append) as alongside:
            alongside.queue.put({"step": 2})
    assert alongside.queue.actor != first.queue.actor
    with ReportStream(seen.append) as later:
        later.queue.put({"step": 3})
    assert later.queue.actor in (first.queue.actor, alongside.queue.actor)
    assert sorted(item["step"] for item in seen) == [1, 2, 3]

    def failing(item: dict) -> None:
        raise ValueError(f"bad report {item['step']}")

    with pytest.raises(ValueError, match="bad report 4"):
        with ReportStream(failing) as stream:
            stream.queue.put({"step": 4})
            stream.queue.put({"step": 5})  # still taken: the run would otherwise wait on the queue
    with ReportStream(seen.append) as after:
        after.queue.put({"step": 6})
    assert seen[-1] == {"step": 6} and stream.queue.actor in (first.queue.actor, alongside.queue.actor)


def test_3_a_worker_group_that_cannot_start_is_told_apart():
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    assert worker_group_start_timed_out(ControllerError(WorkerGroupStartupTimeoutError(2)))
    assert not worker_group_start_timed_out(ControllerError(RuntimeError("other")))
    assert not worker_group_start_timed_out(WorkerGroupStartupTimeoutError(2))


@pytest.mark.parametrize("drop_last", [False, True])
def test_5_a_held_shard_gives_ray_datas_own_batches(ray_cluster, drop_last):
    import ray.data

    dataset = ray.data.from_numpy(np.arange(53)).repartition(3).map_batches(
        lambda b: {"key": b["data"], "features": np.stack([b["data"]] * 2, 1).astype(np.float32)}).materialize()
    ours = HeldShard(dataset.iterator()).iter_torch_batches(batch_size=8, device="cpu", drop_last=drop_last)
    theirs = dataset.iterator().iter_torch_batches(batch_size=8, device="cpu", drop_last=drop_last)
    pairs = list(zip(ours, theirs, strict=True))
    assert len(pairs) == (6 if drop_last else 7)
    for mine, ray_s in pairs:
        assert mine.keys() == ray_s.keys() and all((mine[k] == ray_s[k]).all() for k in mine)


def test_6_preprocessing_sets_fields_ray_data_has_and_restores_them():
    from ray.data import DataContext

    fields = {f.name for f in dataclasses.fields(DataContext)}
    assert set(PREPROCESSING_CONTEXT) <= fields  # a renamed field would be set silently and do nothing
    context = DataContext.get_current()
    before = {name: getattr(context, name) for name in PREPROCESSING_CONTEXT}
    with preprocessing_context():
        assert {name: getattr(context, name) for name in PREPROCESSING_CONTEXT} == PREPROCESSING_CONTEXT
    assert {name: getattr(context, name) for name in PREPROCESSING_CONTEXT} == before


def test_7_the_embedded_system_config_is_ray_s(ray_cluster):
    """ray.init with a key Ray's system config lacks never starts (its GCS exits): the session's
    cluster started with these (tests/conftest.py: embedded_ray_options). That prestarting is off is
    test_session's; here, that Ray took both values."""
    from cluster.session import embedded_ray_options

    import ray

    assert embedded_ray_options()["_system_config"] == EMBEDDED_SYSTEM_CONFIG and ray.is_initialized()
    assert set(EMBEDDED_SYSTEM_CONFIG) == {"prestart_worker_first_driver", "idle_worker_killing_time_threshold_ms"}


def test_8_ray_reads_the_workers_variables(monkeypatch):
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.train.v2._internal import constants

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1234")
    assert get_address_for_submission_client(None) == "http://127.0.0.1:1234"
    assert raycompat.embedded_worker_env(1234)["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1234"
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == PREEMPTION_WATCHER_ENV
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == TRAIN_POLL_ENV


def test_9_tune_s_legacy_console_output_is_chosen_by_its_variable(monkeypatch):
    from ray.tune.experimental.output import get_air_verbosity

    monkeypatch.setenv(TUNE_OUTPUT_ENV, "0")
    assert get_air_verbosity(0) is None  # the legacy reporter, which honours verbose=0
    monkeypatch.setenv(TUNE_OUTPUT_ENV, "1")
    assert get_air_verbosity(0) is not None


def test_11_each_slot_of_a_streamed_split_holds_the_same_rows_whichever_rank_reads_it(ray_cluster):
    """A streamed split cut into 4 slots, read by 2 ranks of 2 slots each and by 4 ranks of one: every
    slot gets the same rows in the same order. One thread reading two of Ray Data's split iterators
    in turn would wait forever at the epoch's start; `side_by_side` reads them together, twice over."""
    import pickle

    import ray
    import ray.data
    from ray.data import ExecutionOptions

    from cluster.raycompat import SlotDataConfig, side_by_side, slot_name

    dataset = ray.data.range(400, override_num_blocks=8)

    @ray.remote(num_cpus=0)
    def read(iterators: list) -> list[list[list[int]]]:
        epochs = []
        for _ in range(2):
            streams = [iterator.iter_batches(batch_size=25) for iterator in iterators]
            rows = [[] for _ in iterators]
            for batches in side_by_side(streams):
                for mine, batch in zip(rows, batches):
                    mine += batch["id"].tolist()
            epochs.append(rows)
        return epochs

    def slots_read_by(world: int) -> list[list[int]]:
        config = pickle.loads(pickle.dumps(SlotDataConfig(4, "train", ExecutionOptions(preserve_order=True), [])))
        iterators = [config.configure({slot_name("train", k): dataset}, world, None, None)[k * world // 4][slot_name("train", k)]
                     for k in range(4)]
        per_rank = 4 // world
        epochs = ray.get([read.remote(iterators[r * per_rank:(r + 1) * per_rank]) for r in range(world)], timeout=120)
        return [slot for rank in epochs for slot in rank[0]], [slot for rank in epochs for slot in rank[1]]

    first, again = slots_read_by(2)
    assert first == again  # the second epoch as the first (no shuffle here)
    assert slots_read_by(4)[0] == first
    rows = [row for slot in first for row in slot]
    assert sorted(rows) == list(range(400)) and {len(slot) for slot in first} == {100}


def test_11_side_by_side_stops_at_the_shortest_and_raises_a_readers_error():
    from cluster.raycompat import side_by_side

    assert list(side_by_side([iter(range(3)), iter(range(5))])) == [[0, 0], [1, 1], [2, 2]]
    assert list(side_by_side([range(2)])) == [[0], [1]]

    def broken():
        yield 1
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        list(side_by_side([broken(), iter(range(5))]))


def test_12_the_workers_storage_context_persists_a_checkpoint_by_name():
    """`retrying_upload` copies with the StorageContext a worker's `get_storage()` returns; the
    retries themselves are tested in test_resume_and_faults.py."""
    import inspect

    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2.api.context import TrainContext

    assert list(inspect.signature(StorageContext.persist_current_checkpoint).parameters) == [
        "self", "checkpoint", "checkpoint_dir_name"]
    assert len(inspect.signature(StorageContext.build_checkpoint_path_from_name).parameters) == 2  # self, a name
    assert hasattr(TrainContext, "get_storage")


def test_14_the_driver_prints_the_gcs_s_error_messages_through_print_to_stdstream(ray_cluster):
    """The thread ray.init starts prints each published error message through the module's
    print_to_stdstream, as pid "raylet"; raylaunch's replacement keeps them (and only them) off."""
    import time

    import ray
    import ray._private.worker as ray_worker
    from ray._private.utils import publish_error_to_driver

    original, seen, printed = ray_worker.print_to_stdstream, [], []
    ray_worker.print_to_stdstream = lambda data, *args, **kwargs: seen.append(data)
    try:
        raycompat.drop_driver_error_messages()
        quiet = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = lambda data, *args, **kwargs: printed.append(data) or quiet(data, *args, **kwargs)
        publish_error_to_driver("raylaunch_test", "a message for every driver",
                                gcs_client=ray._private.worker.global_worker.gcs_client)
        deadline = time.monotonic() + 30
        while not printed and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        ray_worker.print_to_stdstream = original
    assert printed and printed[0]["pid"] == "raylet" and "a message for every driver" in printed[0]["lines"][0]
    assert seen == []  # dropped
    kept = []
    ray_worker.print_to_stdstream = lambda data, *args, **kwargs: kept.append(data)
    try:
        raycompat.drop_driver_error_messages()
        ray_worker.print_to_stdstream({"pid": 123, "lines": ["a worker's line"], "is_err": False})
    finally:
        ray_worker.print_to_stdstream = original
    assert kept == [{"pid": 123, "lines": ["a worker's line"], "is_err": False}]  # a worker's own lines pass
