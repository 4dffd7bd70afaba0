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
                                "resample_probability": 0.0, "space": {"train.lr": {"grid": [1.0e-6, 3.0e-3]}}})
    code = main(["run", config, "--stages", "preprocess,tune"])
    out = capsys.readouterr().out
    assert code == 0, out
    run_dir = tmp_path / "run"
    table = pd.read_parquet(run_dir / "tune" / "trials.parquet")
    assert len(table) == 2 and (table["status"] == "completed").all() and (table["epochs_run"] == 3).all()
    # At least one exploit: a trial lists the checkpoint ("trial@step") it continued from.
    moved = table[table["continued_from"] != ""]
    assert len(moved) >= 1, table.to_string()
    per_epoch = data_meta(run_dir)["rows"]["train"] // 64
    continued = 0
    for _, row in moved.iterrows():
        trial_id = "_".join(row["trial"].split("_")[2:4])  # _trial_<experiment>_<index>_...
        for origin in row["continued_from"].split():
            source, step = origin.split("@")
            assert source != trial_id and any(source in other for other in table["trial"])
            # A new Ray Train run for the trial, started at the copied checkpoint's position: its first
            # checkpoint is one epoch past the source's step, not one epoch from scratch. A copy of
            # the source's last epoch leaves nothing to train: its one report is that position.
            run = run_dir / "ray" / f"trial-{trial_id}-from-{source}-step{step}"
            positions = [json.loads(p.read_text()) for p in run.glob("checkpoint_*/position.json")]
            first = min(p["step"] for p in positions)
            assert first == int(step) + per_epoch or (first == int(step) and len(positions) == 1 and
                                                      positions[0]["epoch"] == 3), positions
            assert {p["trial"] for p in positions} == {trial_id}
            continued += first > int(step)
    assert continued >= 1
    for trial in table["trial"]:
        reports = _reports(run_dir, trial)
        # An exploit continues at the source's epoch, so epochs can repeat (even after a trial's
        # last report: PBT may still replace it with a copy of a better one, which then finishes).
        epochs = [r["epoch"] for r in reports]
        assert epochs[0] == 1 and epochs[-1] == max(epochs) == 3
        # The optimizer trained with the trial's own (perturbed) lr, not the one in the copied state.
        assert reports[-1]["lr"] == pytest.approx(reports[-1]["config"]["train.lr"])
    assert "continued from other trials' checkpoints by pbt" in " ".join(out.split())


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
