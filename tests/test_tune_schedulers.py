"""Sweep schedulers on real trials: PBT continues the worst trial from a top trial's DeepSpeed
checkpoint with its own values; ASHA stops weak trials before their last epoch, and a diverging
trial is recorded while the sweep goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import data_meta, sweep_config
from launcher.cli import main

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def _reports(run_dir: Path, trial: str) -> list[dict]:
    """Every report Tune received from a trial (tune/reports.jsonl), in order."""
    lines = (run_dir / "tune" / "reports.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["trial"] == trial]


@pytest.mark.ray
def test_pbt_continues_the_worst_trial_from_a_top_trials_deepspeed_checkpoint(ray_cluster, quickstart_cache, tmp_path, capsys):
    config = sweep_config(tmp_path, quickstart_cache, {"scheduler": "pbt", "num_samples": 1, "perturbation_interval": 1, "quantile_fraction": 0.5,
                                "resample_probability": 0.0, "synch": True, "space": {"train.lr": {"grid": [1.0e-6, 3.0e-3]}}},
                          epochs=2)
    code = main(["run", config, "--stages", "preprocess,tune"])
    out = capsys.readouterr().out
    assert code == 0, out
    run_dir = tmp_path / "run"
    table = pd.read_parquet(run_dir / "tune" / "trials.parquet")
    assert len(table) == 2 and (table["status"] == "completed").all() and (table["epochs_run"] == 2).all()
    # Under tune.synch both trials are judged on epoch 1 together: the tiny lr falls in the bottom half and
    # continues from a copy of the other trial's checkpoint after epoch 1 ("trial@step"); epoch 2 is the
    # last, so nothing is decided there.
    per_epoch = data_meta(run_dir)["rows"]["train"] // 64
    tiny, good = sorted(table["trial"], key=lambda name: int(name.split("_")[3]))  # grid order: 1e-6, 3e-3
    ids = {name: "_".join(name.split("_")[2:4]) for name in table["trial"]}  # _trial_<experiment>_<index>_...
    moved = table.set_index("trial")["continued_from"]
    assert moved[tiny] == f"{ids[good]}@{per_epoch}" and moved[good] == "", table.to_string()
    # A new Ray Train run for the trial, started at the copied checkpoint's position: its checkpoint is
    # one epoch past the source's step, not one epoch from scratch.
    run = run_dir / "ray" / f"trial-{ids[tiny]}-from-{ids[good]}-step{per_epoch}"
    positions = [json.loads(p.read_text()) for p in run.glob("checkpoint_*/position.json")]
    assert positions == [{"trial": ids[tiny], "epoch": 2, "epoch_step": 0, "step": 2 * per_epoch, "workers": 1}]
    for trial in table["trial"]:
        reports = _reports(run_dir, trial)
        # One report per epoch: the exploit continues from the source's position, and the last report
        # ends the trial.
        assert [r["epoch"] for r in reports] == [1, 2]
        # The optimizer trained with the trial's own (perturbed) lr, not the one in the copied state.
        assert reports[-1]["lr"] == pytest.approx(reports[-1]["config"]["train.lr"])
    assert _reports(run_dir, tiny)[-1]["config"]["train.lr"] in (pytest.approx(3.0e-3 * 0.8), pytest.approx(3.0e-3 * 1.2))
    assert "1 continued from other trials' checkpoints by pbt" in " ".join(out.split())


@pytest.mark.ray
def test_asha_stops_weak_trials_early_and_a_diverging_trial_does_not_stop_the_sweep(ray_cluster, quickstart_cache,
                                                                                    tmp_path, capsys):
    # One trial at a time, in grid order, so ASHA's decisions are fixed: the good lr sets the bar at
    # each rung, the tiny one falls below it at the first, and lr 1e30 overflows at its second step.
    config = sweep_config(tmp_path, quickstart_cache, {
        "scheduler": "asha", "search": "grid", "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1,
        "space": {"train.lr": {"grid": [3.0e-3, 1.0e-6, 1.0e30]}}})
    code = main(["run", config, "--stages", "preprocess,tune"])
    out = capsys.readouterr().out
    assert code == 0, out
    table = pd.read_parquet(tmp_path / "run" / "tune" / "trials.parquet").sort_values("train.lr")
    assert list(table["status"]) == ["stopped early", "completed", "error"], table.to_string()
    assert list(table["epochs_run"])[:2] == [1, 3]
    assert "training diverged" in table["error"].iloc[2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["stages"]["tune"]["best_values"] == {"train.lr": 3.0e-3}
    assert "3 teacher trials (1 stopped early by asha, 1 failed)" in " ".join(out.split())


@pytest.mark.ray
def test_a_sweep_whose_every_trial_fails_fails_the_stage_with_each_reason(ray_cluster, quickstart_cache, tmp_path, capsys):
    config = sweep_config(tmp_path, quickstart_cache, {"scheduler": "fifo", "num_samples": 1,
                                                  "space": {"train.lr": {"grid": [1.0e30]}}}, epochs=1)
    assert main(["run", config, "--stages", "preprocess,tune"]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "all 1 trials failed:" in error[0] and "training diverged" in error[0], error
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] == "tune" and "all 1 trials failed" in summary["error"]
    assert not (tmp_path / "run" / "models" / "teacher").exists()


@pytest.mark.ray
def test_a_sweep_whose_largest_trial_cannot_fit_is_refused_before_it_starts(ray_cluster, tmp_path, capsys):
    code = main(["run", str(QUICKSTART), "--set", f"output.dir={tmp_path / 'run'}",
                 "--set", "tune.space.train.workers={choice: [1, 4]}"])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert ("tune.space.train.workers: the largest trial the sweep can sample is a worker group of 4 CPU but the Ray "
            "cluster has 2 CPU (short by 2 CPU)") in " ".join(captured.err.split())
    assert "✓ preprocess" not in captured.out and not (tmp_path / "run" / "models").exists()


@pytest.mark.ray
def test_a_time_budget_too_short_for_any_trial_fails_the_stage_naming_it(ray_cluster, quickstart_cache, tmp_path, capsys):
    config = sweep_config(tmp_path, quickstart_cache, {"scheduler": "fifo", "num_samples": 1, "time_budget_s": 2,
                                                  "space": {"train.lr": {"grid": [3.0e-3]}}})
    assert main(["run", config, "--stages", "preprocess,tune"]) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "tune.time_budget_s: the sweep's 2 s ran out before any trial reported val_accuracy" in error, error
