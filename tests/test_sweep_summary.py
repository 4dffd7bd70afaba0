"""Picking the sweep's winner from its trials' report histories, and writing the trials table and
plot (pure logic, no Ray)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from cluster.raycompat import CHECKPOINT_PATH

from trainers.modeldir import SPEC
from tuning.sweep import _summarize

RUN = {"train": {"epochs": 3, "workers": 2, "cpus_per_worker": 1, "use_gpu": False},
       "tune": {"space": {"train.lr": {"choice": [0.1, 0.01]}}}}


def _trial(tmp_path, name: str, accuracies: list[float], kept: set[int]) -> SimpleNamespace:
    """A finished trial (and its report history) whose reports had these val accuracies; only the `kept` checkpoints are on disk."""
    paths = []
    for epoch in range(len(accuracies)):
        path = tmp_path / name / f"checkpoint_{epoch}"
        if epoch in kept:
            path.mkdir(parents=True)
            (path / SPEC).write_text("{}")  # written last: the checkpoint's model is complete
        paths.append(str(path))
    history = pd.DataFrame({"epoch": range(1, len(accuracies) + 1), "val_accuracy": accuracies, CHECKPOINT_PATH: paths,
                            "time_this_iter_s": [900.0] * len(accuracies)})
    return SimpleNamespace(config={"train.lr": 0.1}, path=str(tmp_path / name), error=None), history


def _summarize_trials(trials):
    return _summarize([result for result, _ in trials], {Path(r.path).name: h for r, h in trials}, RUN, "val_accuracy", "max")


def test_a_tie_picks_the_checkpoint_ray_kept(tmp_path):
    # Epochs 2 and 3 tie; Ray Train (keep 1 by score) kept the later one and deleted the earlier.
    sweep = _summarize_trials([_trial(tmp_path, "a", [0.90, 0.976, 0.976], kept={2})])
    assert sweep.best_checkpoint == str(tmp_path / "a" / "checkpoint_2")
    assert sweep.best_metrics["val_accuracy"] == 0.976


def test_the_best_trial_wins_and_its_reported_best_counts(tmp_path):
    trials = [_trial(tmp_path, "a", [0.80, 0.85, 0.90], kept={2}), _trial(tmp_path, "b", [0.70, 0.95], kept={1})]
    sweep = _summarize_trials(trials)
    assert sweep.best_trial == "b" and sweep.best_checkpoint == str(tmp_path / "b" / "checkpoint_1")
    rows = {t["trial"]: t for t in sweep.trials}
    assert rows["a"]["status"] == "completed" and rows["b"]["status"] == "stopped early"
    assert rows["a"]["wall_s"] == 2700.0 and rows["a"]["cpu_hours"] == 1.5 and rows["a"]["gpu_hours"] == 0.0


def test_trials_table_and_plot_are_written_with_every_trial(tmp_path):
    from tuning.results import write_trials

    trials = [{"trial": "a", "train.lr": 0.01, "train.zero.stage": 2, "val_accuracy": 0.9, "epochs_run": 3,
               "status": "completed", "error": "", "cpu_hours": 0.1},
              {"trial": "b", "train.lr": 0.1, "train.zero.stage": "auto", "val_accuracy": 0.8, "epochs_run": 1,
               "status": "stopped early", "error": "", "cpu_hours": 0.03},
              {"trial": "c", "train.lr": 10.0, "train.zero.stage": 3, "val_accuracy": float("nan"), "epochs_run": 0,
               "status": "error", "error": "FloatingPointError: loss is nan", "cpu_hours": 0.01}]
    space = {"train.lr": {"loguniform": [0.001, 20.0]}, "train.zero.stage": {"choice": [2, 3, "auto"]}}
    files = write_trials(trials, tmp_path / "tune", "val_accuracy", space)
    table = pd.read_parquet(files["trials_file"])
    assert list(table["trial"]) == ["a", "b", "c"] and table["train.zero.stage"].tolist() == ["2", "auto", "3"]
    assert table.loc[2, "error"].startswith("FloatingPointError")
    png = (tmp_path / "tune" / "metric_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000



def test_the_console_table_keeps_every_trial_id_whole_on_a_narrow_console():
    from rich.console import Console

    from launcher.report import print_trials

    trials = [{"trial": f"_trial_aa104_0000{i}_{i}_train_lr=0.002", "train.lr": 0.002, "model.width": 32,
               "val_accuracy": 0.98 - i / 100, "epochs_run": 8, "status": "stopped early", "error": "", "cpu_hours": 0.03}
              for i in range(3)]
    console = Console(width=80, record=True)
    print_trials(console, trials, "val_accuracy", ["train.lr", "model.width"])
    text = console.export_text()
    assert all(f"aa104_0000{i}" in text for i in range(3))


def test_the_report_names_trials_by_the_id_the_console_shows(tmp_path):
    from launcher.report import write_report
    from launcher.report_html import short_trial

    name = "_trial_82686_00000_0_model_width=64,train_lr=0.0022_2026-12-07_09-20-58"
    assert short_trial(name) == "82686_00000" and short_trial("b") == "b"
    trial = {"trial": name, "train.lr": 0.0022, "val_accuracy": 0.99, "epochs_run": 8, "status": "completed",
             "error": "", "cpu_hours": 0.01}
    summary = {"status": "succeeded", "stages": {"tune": {"trials": [trial], "best_trial": name,
                                                          "best_values": {"train.lr": 0.0022}, "seconds": 60,
                                                          "cpu_hours": 0.01, "gpu_hours": 0.0}}, "models": {}}
    markdown, page = write_report(tmp_path, summary)
    assert "best 82686_00000 {" in markdown.read_text() and "_trial_" not in page.read_text()
