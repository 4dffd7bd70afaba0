"""A sweep of distill paths (alpha, temperature) runs after the teacher's training: each trial
distills that teacher with its values, and the best trial's student is the run's student."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from conftest import sweep_config
from launcher.cli import main


def test_a_sweep_of_distill_paths_distills_the_trained_teacher_in_each_trial(ray_cluster, quickstart_cache, tmp_path,
                                                                             capsys):
    tune = {"search": "grid", "scheduler": "fifo",
            "space": {"distill.alpha": {"grid": [0.0, 1.0]}, "distill.temperature": {"grid": [2.0]}}}
    config = sweep_config(tmp_path, quickstart_cache, tune, epochs=1)
    raw = yaml.safe_load(open(config))
    raw["distill"] = {"student": {"type": "mlp", "width": 16, "depth": 1}, "epochs": 3, "lr": 1.0e-2,
                      "teacher_outputs": "precompute"}
    raw["quantize"] = {"enabled": False}
    with open(config, "w") as f:
        yaml.safe_dump(raw, f)

    assert main(["run", config]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["preprocess", "train", "tune", "evaluate"]
    assert summary["stages"]["tune"]["role"] == "student" and "2 student trials" in out
    # The teacher's outputs were computed once, for both trials.
    assert out.count("teacher outputs: logits for") == 1
    trials = pd.read_parquet(run_dir / "tune" / "trials.parquet")
    assert sorted(trials["distill.alpha"]) == [0.0, 1.0] and (trials["status"] == "completed").all()
    # Each trial trained the same student from the same seed on the same batches with its own
    # alpha (0: the labels only, 1: the teacher only): only that can make their losses differ.
    reports = [json.loads(line) for line in (run_dir / "tune" / "reports.jsonl").read_text().splitlines()]
    first = {}
    for r in reports:
        first.setdefault(r["config"]["distill.alpha"], r["train_loss"])  # epoch 1's
    assert abs(first[1.0] - first[0.0]) > 0.1
    student = json.loads((run_dir / "models" / "student" / "model.json").read_text())
    assert student["model"]["width"] == 16 and json.loads((run_dir / "models" / "teacher" / "model.json").read_text())["model"]["width"] == 32
    assert set(summary["models"]) == {"teacher", "student"} and summary["models"]["student"]["accuracy"] > 0.3
    # The run's student is the best trial's best checkpoint: its weights are those of a kept checkpoint
    # reported with the sweep's best val_accuracy, and only the best trial's.
    tune = summary["stages"]["tune"]
    assert tune["best_metrics"]["val_accuracy"] == trials["val_accuracy"].max()
    weights = (run_dir / "models" / "student" / "model.safetensors").read_bytes()
    kept = [r for r in reports if r.get("checkpoint_path") and (Path(r["checkpoint_path"]) / "model.safetensors").exists()]
    same = [r for r in kept if (Path(r["checkpoint_path"]) / "model.safetensors").read_bytes() == weights]
    assert same and {(r["trial"], r["val_accuracy"]) for r in same} == {(tune["best_trial"], trials["val_accuracy"].max())}
    best = yaml.safe_load((run_dir / "tune" / "best_config.yaml").read_text())
    assert best["distill"]["alpha"] == summary["stages"]["tune"]["best_values"]["distill.alpha"]
    assert best["tune"]["enabled"] is False
