"""The quickstart end to end at a tiny scale, submitted as a Ray job to a real head (token auth
on) the way a cluster runs it: every artifact, and numbers that are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import data_meta
from launcher.cli import main

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_quickstart_submitted_as_a_job_produces_every_artifact(client_env, quickstart_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["submit", str(QUICKSTART), "--address", client_env, "--set", f"output.dir={run_dir}",
                 "--set", f"data.cache_dir={quickstart_cache}", "--set", "tune.num_samples=2",
                 "--set", "tune.grace_period=1", "--set", "train.epochs=3", "--set", "distill.epochs=4",
                 "--set", "distill.student.width=8", "--set", "quantize.max_drop=0.2"])
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = out.split()[1]
    assert f"job {job_id} succeeded" in out
    for stage in ("preprocess", "tune", "distill", "quantize", "evaluate"):
        assert f"✓ {stage}" in out
    assert "Failed to query" not in out and "INFO" not in out.split("Running entrypoint")[-1]  # Ray's chatter stays hidden

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    quantized = {f"student-{m}" for m in ("int8_dynamic", "int8_weight_only", "static_int8")}
    assert set(summary["models"]) == {"teacher", "student"} | quantized
    for name, model in summary["models"].items():
        assert model["accuracy"] > 0.3, name  # chance is 0.1
        assert model["size_bytes"] == (run_dir / "models" / name / "model.safetensors").stat().st_size
        assert 0 < model["latency_ms_p50"] <= model["latency_ms_p95"] and model["rows_per_s_b64"] > 0
    models = summary["models"]
    # The sweep may pick a width-16 teacher (13.7k params); a width-8 student has 3.7k.
    assert models["student"]["params"] < models["teacher"]["params"] / 3
    assert all(models[q]["params"] == models["student"]["params"] and models[q]["status"] == "accepted" for q in quantized)
    # static_int8 stores convolutions and linears in int8; the others quantize the linears only.
    assert models["student-static_int8"]["size_bytes"] < models["student"]["size_bytes"] / 2.5
    skipped = summary["stages"]["quantize"]["skipped"]
    assert set(skipped) <= {"int4_weight_only"}
    report = (run_dir / "report.md").read_text()
    assert "| student-static_int8 |" in report and "](models.png)" in report
    assert (run_dir / "models.png").stat().st_size > 10_000
    if skipped:
        assert f"Not quantized with int4_weight_only: {skipped['int4_weight_only']}" in report

    # Every exported model predicts raw rows (the digits' own feature columns, unnormalized).
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(digits.feature_names) + "\n" + "\n".join(",".join(f"{v:g}" for v in r) for r in digits.data[:50]))
    for name in models:
        written = tmp_path / f"{name}.jsonl"
        assert main(["predict", str(run_dir / "models" / name), str(rows), "--output", str(written)]) == 0, name
        predicted = [json.loads(line)["class"] for line in written.read_text().splitlines()]
        assert sum(p == t for p, t in zip(predicted, digits.target[:50])) > 30, name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 3
    assert data_meta(run_dir)["rows"]["test"] > 200
    trials = summary["stages"]["tune"]["trials"]
    assert len(trials) == 2 and all(t["status"] != "error" for t in trials)
    best = max(t["val_accuracy"] for t in trials)
    assert summary["stages"]["tune"]["best_metrics"]["val_accuracy"] == best
    # Every trial in tune/trials.parquet with its CPU-hours, the plot beside it, both in the report.
    import pandas as pd

    table = pd.read_parquet(run_dir / "tune" / "trials.parquet")
    assert len(table) == 2 and {"train.lr", "model.width", "val_accuracy", "status", "cpu_hours"} <= set(table.columns)
    assert (table["cpu_hours"] > 0).all() and summary["stages"]["tune"]["cpu_hours"] == pytest.approx(table["cpu_hours"].sum(), abs=1e-3)
    assert (run_dir / "tune" / "metric_vs_params.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "](tune/metric_vs_params.png)" in report and "Sweep trials" in out
    best_config = yaml.safe_load((run_dir / "tune" / "best_config.yaml").read_text())
    best_values = summary["stages"]["tune"]["best_values"]
    assert best_config["train"]["lr"] == best_values["train.lr"] and best_config["model"]["width"] == best_values["model.width"]
    assert best_config["tune"]["enabled"] is False and best_config["train"]["epochs"] == 3

