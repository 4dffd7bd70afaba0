"""A run resumed on another worker count ends where the uninterrupted run does: ZeRO's partitioned
optimizer state goes through DeepSpeed's universal checkpoint, the gradient accumulation changes to
keep the global batch, and the micro-batch slots keep the rows of every step (no row skipped or
trained twice in the epoch). The CLI keeps the global batch on `--resume --set train.workers=N`
and refuses a count that cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from ray.train.v2.api.exceptions import TrainingFailedError
from safetensors.torch import load_file

from conftest import raylaunch
from launcher.cli import main
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig
from test_resume_and_faults import EPOCHS, _assert_every_row_once_an_epoch
from trainers.fit import build_trainer, load_splits
from trainers.worker import Fault, worker_config

QUICKSTART = str(Path(__file__).parent.parent / "configs" / "quickstart.yaml")
SLOTS = 2  # micro batches per optimizer step: 2 workers x 1, or 1 worker x 2
RELATIVE = 1e-5


def _config(stage: int, workers: int) -> ResolvedConfig:
    return ResolvedConfig.of(RunConfig.model_validate({
        # No dropout: its masks come from each rank's own random stream, another on another count.
        "model": {"type": "mlp", "width": 32, "depth": 1, "dropout": 0.0},
        "train": {"workers": workers, "grad_accum_steps": SLOTS // workers, "epochs": EPOCHS, "micro_batch_size": 128,
                  "lr": 3e-3, "warmup_steps": 2, "zero": {"stage": stage}, "checkpoint_every": 2, "keep_checkpoints": 100},
    }))


def _fit(run: ResolvedConfig, digits_data, storage, fault: Fault | None = None, in_memory: bool = False, trace=None):
    data_dir, meta = digits_data
    config = worker_config(run, meta).replace(fault=fault, trace=str(trace) if trace else None)
    return build_trainer(config, load_splits(data_dir, in_memory), storage, name="run").fit()


def _history(result) -> list[tuple[int, float, int]]:
    """(step, train loss, worker count) of every checkpoint kept."""
    rows = []
    for checkpoint, metrics in result.best_checkpoints:
        position = json.loads(Path(checkpoint.path, "position.json").read_text())
        rows.append((metrics["step"], metrics["train_loss"], position["workers"]))
    return sorted(rows)


def _weights(result) -> dict[str, torch.Tensor]:
    last = max(result.best_checkpoints, key=lambda pair: pair[1]["step"])[0].path
    return load_file(f"{last}/model.safetensors")


@pytest.fixture(scope="module")
def straight(digits_data, tmp_path_factory):
    """Uninterrupted 2-worker runs: (stage, held in memory) -> (history, final weights)."""
    runs = {}

    def run(stage: int, in_memory: bool):
        if (stage, in_memory) not in runs:
            result = _fit(_config(stage, 2), digits_data, tmp_path_factory.mktemp("straight"), in_memory=in_memory)
            runs[stage, in_memory] = _history(result), _weights(result)
        return runs[stage, in_memory]

    return run


@pytest.mark.parametrize(("stage", "before", "after", "in_memory"),
                         [(2, 2, 1, False), (2, 1, 2, False), (3, 2, 1, True), (3, 1, 2, True), (0, 2, 1, True)],
                         ids=["zero2_two_workers_resumed_on_one_streamed", "zero2_one_worker_resumed_on_two_streamed",
                              "zero3_two_workers_resumed_on_one_held", "zero3_one_worker_resumed_on_two_held",
                              "zero0_two_workers_resumed_on_one_held_loads_the_whole_state_as_it_is"])
def test_a_run_resumed_on_another_worker_count_ends_where_the_uninterrupted_two_worker_run_does(
        straight, digits_data, tmp_path, stage, before, after, in_memory):
    """Killed after step 5 on `before` workers (its latest checkpoint: step 4), continued on `after`."""
    history, weights = straight(stage, in_memory)
    trace = tmp_path / "trace"
    trace.mkdir()
    fault = Fault(rank=0, step=5, where="step", marker=str(tmp_path / "killed"))
    with pytest.raises(TrainingFailedError):
        _fit(_config(stage, before), digits_data, tmp_path / "ray", fault, in_memory, trace)
    result = _fit(_config(stage, after), digits_data, tmp_path / "ray", in_memory=in_memory, trace=trace)

    resumed = _history(result)
    # Steps 2 and 4 checkpointed on `before` (step 4's only if Ray Train took its report before the kill).
    counts = [workers for _, _, workers in resumed]
    kept = counts.count(before)
    assert [step for step, _, _ in resumed] == [2, 4, 6, 8] and kept in (1, 2) and counts == [before] * kept + [after] * (4 - kept)
    for (_, loss, _), (_, straight_loss, _) in zip(resumed, history, strict=True):
        assert loss == pytest.approx(straight_loss, rel=RELATIVE)
    final = _weights(result)
    assert final.keys() == weights.keys()
    for name in weights:
        scale = weights[name].abs().max()
        assert (final[name] - weights[name]).abs().max() <= RELATIVE * scale, name
    _assert_every_row_once_an_epoch(trace, digits_data[0], slots=SLOTS, restarted=False)


def test_resume_on_another_worker_count_keeps_the_global_batch_and_refuses_a_count_that_cannot(
        ray_cluster, quickstart_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", QUICKSTART, "--stages", "preprocess,train", "--set", f"output.dir={run_dir}",
            "--set", f"data.cache_dir={quickstart_cache}", "--set", "tune.enabled=false", "--set", "train.epochs=1",
            "--set", "model={type: mlp, width: 16, depth: 1}", "--set", "train.zero.stage=2"]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["stages"]["train"]  # as if the driver died before recording the stage
    (run_dir / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()

    refused = raylaunch(*args, "--resume", "--set", "train.workers=3")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == ("train.workers: the run's global batch is 2 micro batches of 32 rows, which 3 "
                                      "workers cannot share evenly; resume on 1 or 2 workers")
    assert refused.stdout == ""
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["workers"] == 2  # nothing changed

    assert main([*args, "--resume", "--set", "train.workers=1"]) == 0
    assert "continuing from the checkpoint at step" in " ".join(capsys.readouterr().out.split())
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert (train["workers"], train["grad_accum_steps"]) == (1, 2)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "succeeded"
