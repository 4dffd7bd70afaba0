"""Picking the sweep's winner from its trials' report histories (pure logic, no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from trainers.checkpoint import WEIGHTS
from tuning.sweep import _summarize

RUN = {"train": {"epochs": 3}}


def _trial(tmp_path, name: str, accuracies: list[float], kept: set[int]) -> SimpleNamespace:
    """A finished trial whose reports had these val accuracies; only the `kept` checkpoints are on disk."""
    paths = []
    for epoch in range(len(accuracies)):
        path = tmp_path / name / f"checkpoint_{epoch}"
        if epoch in kept:
            path.mkdir(parents=True)
            (path / WEIGHTS).write_bytes(b"weights")
        paths.append(str(path))
    history = pd.DataFrame({"epoch": range(1, len(accuracies) + 1), "val_accuracy": accuracies, CHECKPOINT_PATH_KEY: paths})
    return SimpleNamespace(config={"train.lr": 0.1}, metrics_dataframe=history, path=str(tmp_path / name), error=None)


def test_a_tie_picks_the_checkpoint_ray_kept(tmp_path):
    # Epochs 2 and 3 tie; Ray Train (keep 1 by score) kept the later one and deleted the earlier.
    sweep = _summarize([_trial(tmp_path, "a", [0.90, 0.976, 0.976], kept={2})], RUN, "val_accuracy", "max")
    assert sweep.best_checkpoint == tmp_path / "a" / "checkpoint_2"
    assert sweep.best_metrics["val_accuracy"] == 0.976


def test_the_best_trial_wins_and_its_reported_best_counts(tmp_path):
    trials = [_trial(tmp_path, "a", [0.80, 0.85, 0.90], kept={2}), _trial(tmp_path, "b", [0.70, 0.95], kept={1})]
    sweep = _summarize(trials, RUN, "val_accuracy", "max")
    assert sweep.best_trial == "b" and sweep.best_checkpoint == tmp_path / "b" / "checkpoint_1"
    rows = {t["trial"]: t for t in sweep.trials}
    assert rows["a"]["status"] == "completed" and rows["b"]["status"] == "stopped early"
