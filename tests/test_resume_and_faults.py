"""Checkpoints that resume exactly: an interrupted run, resumed, ends bitwise where an uninterrupted
one does, whether the interruption is a killed driver (`--resume`), a worker killed mid-epoch
(Ray Train restarts the group) or a worker killed while saving a checkpoint; with the splits
streamed to the ranks and with them held in memory (`data.in_memory`: cut into one shard a rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray.train.v2.api.exceptions import TrainingFailedError
from safetensors.torch import load_file

from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig
from trainers.fit import build_trainer, load_splits
from trainers.worker import Fault, worker_config

EPOCHS, MICRO_BATCH = 2, 128  # digits: 1,259 train rows / 2 workers / 128 = 4 steps per epoch


def _config(stage: int = 2, **train) -> ResolvedConfig:
    return ResolvedConfig.of(RunConfig.model_validate({
        "model": {"type": "mlp", "width": 32, "depth": 1, "dropout": 0.1},  # dropout: the RNG state matters
        "train": {"workers": 2, "epochs": EPOCHS, "micro_batch_size": MICRO_BATCH, "lr": 3e-3, "warmup_steps": 2,
                  "zero": {"stage": stage}, "checkpoint_every": 2, "keep_checkpoints": 100} | train,
    }))


def _fit(run: ResolvedConfig, meta: dict, data_dir, storage, name: str, fault: Fault | None = None,
         in_memory: bool = False, trace: Path | None = None, storage_filesystem=None):
    config = worker_config(run, meta).replace(fault=fault)
    if trace:
        trace.mkdir()
        config = config.replace(trace=str(trace))
    return build_trainer(config, load_splits(data_dir, in_memory), storage, name=name,
                         storage_filesystem=storage_filesystem).fit()


def _history(result) -> list[tuple[int, float]]:
    """(step, train loss of that step) for every reported step, from the checkpoints kept."""
    rows = sorted((m["step"], m["train_loss"]) for _, m in result.best_checkpoints)
    return rows


def _last_checkpoint(result) -> str:
    return max(result.best_checkpoints, key=lambda pair: pair[1]["step"])[0].path


def _final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(f"{_last_checkpoint(result)}/model.safetensors")


def _straight(digits_data, storage, in_memory: bool):
    """(every reported step's loss, the final weights, the final checkpoint's path)."""
    data_dir, meta = digits_data
    result = _fit(_config(), meta, data_dir, storage, "straight", in_memory=in_memory)
    return _history(result), _final_weights(result), _last_checkpoint(result)


@pytest.fixture(scope="module")
def straight(digits_data, tmp_path_factory):
    """An uninterrupted run with the splits streamed."""
    return _straight(digits_data, tmp_path_factory.mktemp("straight"), in_memory=False)


@pytest.fixture(scope="module")
def straight_held(digits_data, tmp_path_factory):
    """An uninterrupted run with the splits held in memory."""
    return _straight(digits_data, tmp_path_factory.mktemp("straight-held"), in_memory=True)


def _assert_same_run(result, straight) -> None:
    history, weights, _ = straight
    assert _history(result) == history  # every step's loss, exactly
    resumed = _final_weights(result)
    assert resumed.keys() == weights.keys()
    for name in weights:
        assert torch.equal(resumed[name], weights[name]), name


def test_straight_run_reports_every_other_step(straight):
    history, _, _ = straight
    assert [step for step, _ in history] == list(range(2, 4 * EPOCHS + 1, 2))


def test_resume_after_killed_run_matches_uninterrupted_run_with_the_data_held_in_memory(straight_held, digits_data,
                                                                                        tmp_path):
    data_dir, meta = digits_data
    fault = Fault(rank=1, step=5, where="step", marker=str(tmp_path / "killed"))
    with pytest.raises(TrainingFailedError):  # max_failures 0: the run stops, as if its driver had died
        _fit(_config(), meta, data_dir, tmp_path / "ray", "run", fault, in_memory=True)
    assert (tmp_path / "killed").exists()
    # Same name and storage: Ray Train finds the run's checkpoints and the loop continues from the latest.
    result = _fit(_config(), meta, data_dir, tmp_path / "ray", "run", in_memory=True)
    _assert_same_run(result, straight_held)


@pytest.mark.parametrize(("where", "step", "in_memory"),
                         [("step", 3, False), ("save:deepspeed", 4, False), ("save", 6, True), ("upload", 6, True)],
                         ids=["killed_mid_epoch_restarts_from_the_last_checkpoint_streamed",
                              "killed_once_deepspeed_saved_its_state_streamed",
                              "killed_before_uploading_leaves_the_previous_checkpoint_loadable_held_in_memory",
                              "killed_halfway_through_uploading_held_in_memory"])
def test_worker_killed_is_restarted_and_matches_uninterrupted_run(request, digits_data, tmp_path, where, step, in_memory):
    """Rank 1 dies after a step, or inside saving that step's checkpoint: DeepSpeed's state written
    and the rest not, every file written and none uploaded, or its upload half done (its storage
    dies as it opens the file it uploads after its DeepSpeed state). Ray Train restarts the group
    from the last checkpoint every rank uploaded; the run ends bitwise where an uninterrupted one
    does. Streamed, every row is trained on by exactly one rank once an epoch, the restored group
    taking again exactly the batches the lost one had taken since that checkpoint."""
    from faults import dying_upload

    data_dir, meta = digits_data
    marker = tmp_path / "killed"
    fault = None if where == "upload" else Fault(rank=1, step=step, where=where, marker=str(marker))
    # Checkpoints at steps 2, 4, 6, 8: the third upload is step 6's.
    storage = dying_upload("rng_rank1.pt", 3, marker) if where == "upload" else None
    trace = None if in_memory else tmp_path / "trace"
    result = _fit(_config(max_failures=1), meta, data_dir, tmp_path / "ray", "run", fault, in_memory=in_memory,
                  trace=trace, storage_filesystem=storage)
    assert marker.exists()
    _assert_same_run(result, request.getfixturevalue("straight_held" if in_memory else "straight"))
    if where == "upload":  # the lost rank's part of step 6's first checkpoint never arrived
        halves = [p for p in (tmp_path / "ray" / "run").glob("checkpoint_*/") if not (p / "rng_rank1.pt").exists()]
        assert len(halves) == 1 and (halves[0] / "rng_rank0.pt").exists()
    if trace:
        _assert_every_row_once_an_epoch(trace, data_dir, slots=2)


def _assert_every_row_once_an_epoch(trace: Path, data_dir, slots: int, restarted: bool = True) -> None:
    """Each epoch trains on every row of the streamed split (but the remainder) once: each micro-batch
    slot's rows once, whichever rank and worker count trained on it; a step trained again after a
    restart, on the very rows it had before."""
    from dataprep.stream import stream_split

    train = set(stream_split(data_dir, "train").to_pandas()["key"].tolist())
    taken = {}  # (epoch, slot, step in the epoch) -> the row keys it trained on
    for log in sorted(trace.glob("rank*.jsonl")):
        pids = []
        for line in log.read_text().splitlines():
            record = json.loads(line)
            pids += [record["pid"]] if record["pid"] not in pids else []
            where = (record["epoch"], record["slot"], record["epoch_step"])
            if where in taken:  # the restored group again: the very rows the lost one had
                assert taken[where] == record["keys"], where
            taken[where] = record["keys"]
        assert not restarted or len(pids) == 2  # this rank's worker, and the one the restart started
    per_slot = len(train) // slots // MICRO_BATCH * MICRO_BATCH  # the documented remainder dropped
    for epoch in range(EPOCHS):
        keys = [k for (e, _, _), batch in taken.items() if e == epoch for k in batch]
        assert len(keys) == len(set(keys)) == slots * per_slot and set(keys) <= train, epoch


def test_a_run_handed_a_final_checkpoint_reports_its_last_epoch_without_training(straight, digits_data, tmp_path):
    """PBT can hand a trial another trial's checkpoint from the end of training: the run trains
    nothing, and still reports the last epoch with those weights' validation metrics (Tune would
    otherwise take the trial for one stopped early)."""
    data_dir, meta = digits_data
    config = worker_config(_config(), meta).replace(start_from=straight[2])
    result = build_trainer(config, load_splits(data_dir), tmp_path, name="adopted").fit()
    (checkpoint, metrics), = result.best_checkpoints
    assert (metrics["epoch"], metrics["step"], metrics["step_log"]) == (EPOCHS, straight[0][-1][0], [])
    assert "train_loss" not in metrics and 0 <= metrics["val_accuracy"] <= 1
    weights = load_file(f"{checkpoint.path}/model.safetensors")
    assert all(torch.equal(weights[name], straight[1][name]) for name in weights)


def _fit_uploading(digits_data, tmp_path, storage, async_upload: bool = True):
    data_dir, meta = digits_data
    return build_trainer(worker_config(_config(), meta), load_splits(data_dir), tmp_path / "ray", name="run",
                         storage_filesystem=storage, async_upload=async_upload).fit()


def test_an_upload_that_fails_once_is_retried_and_the_run_ends_as_an_uninterrupted_one(straight, digits_data, tmp_path):
    """Checkpoints uploaded in a thread while training goes on: the third one's first try fails."""
    from faults import failing_upload

    result = _fit_uploading(digits_data, tmp_path, failing_upload("rng_rank0.pt", 3, 1, tmp_path / "count"))
    assert int((tmp_path / "count").read_text()) == 5  # 4 checkpoints, one tried twice
    _assert_same_run(result, straight)
    stalls = [m["checkpoint_stall_s"] for _, m in result.best_checkpoints if "checkpoint_stall_s" in m]
    assert len(stalls) == 3 and all(s > 0 for s in stalls)  # each checkpoint's, sent with the next


@pytest.mark.parametrize("async_upload", [True, False], ids=["async", "sync"])
def test_an_upload_that_keeps_failing_fails_the_run_naming_it_and_the_one_before_stays_the_latest(
        digits_data, tmp_path, async_upload):
    from cluster.raycompat import CHECKPOINT_SNAPSHOT, UPLOAD_ATTEMPTS, latest_checkpoint_metrics
    from faults import failing_upload

    storage = failing_upload("rng_rank0.pt", 3, 99, tmp_path / "count")
    with pytest.raises(TrainingFailedError) as failed:
        _fit_uploading(digits_data, tmp_path, storage, async_upload)
    message = " ".join(str(failed.value).split())
    assert f"the checkpoint at step 6: uploading it to {tmp_path / 'ray' / 'run'}/checkpoint_" in message
    assert f"failed {UPLOAD_ATTEMPTS} times (injected: the storage refused rng_rank0.pt)" in message
    snapshot = (tmp_path / "ray" / "run" / CHECKPOINT_SNAPSHOT).read_text()
    assert latest_checkpoint_metrics(snapshot)["step"] == 4
