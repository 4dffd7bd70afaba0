"""The quickstart end to end at a tiny scale, submitted with `raylaunch submit` to a real Ray head
(token auth on) the way a cluster runs it: every artifact, numbers that are real, the metric logs
(TensorBoard, MLflow) and report.html as Chromium renders it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import data_meta, skip_or_fail
from launcher.cli import main

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def quickstart_job(ray_head, quickstart_cache, tmp_path_factory):
    """The tiny quickstart run as a job (once for this module's tests): (run_dir, stdout, stderr).
    Its output.dir is a `file://` URI: Ray Train and Tune write their checkpoints through pyarrow's
    filesystem, and the driver's files are copied up from its staging folder (cluster.remote)."""
    run_dir = tmp_path_factory.mktemp("quickstart-job") / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_TOKEN_PATH"] = str(ray_head["token"])
    done = subprocess.run(
        [str(Path(sys.executable).parent / "raylaunch"), "submit", str(QUICKSTART), "--address", ray_head["address"],
         "--set", f"output.dir={run_dir.as_uri()}", "--set", f"data.cache_dir={quickstart_cache}", "--set", "tune.num_samples=2",
         "--set", "tune.grace_period=1", "--set", "train.epochs=2", "--set", "distill.epochs=3",
         "--set", "distill.student.width=8", "--set", "quantize.max_drop=0.2", "--set", "output.mlflow=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, done.stdout, done.stderr


def test_quickstart_submitted_as_a_job_produces_every_artifact(quickstart_job, tmp_path):
    run_dir, out, err = quickstart_job
    job_id = out.split()[1]
    assert f"job {job_id} succeeded" in out
    for stage in ("preprocess", "tune", "distill", "quantize", "evaluate"):
        assert f"✓ {stage}" in out
    # Ray's, DeepSpeed's and MLflow's own chatter stays hidden.
    assert "Failed to query" not in out and "INFO" not in out.split("Running entrypoint")[-1] and not err.strip()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    quantized = {f"student-{m}" for m in ("int8_dynamic", "int8_weight_only", "static_int8")}
    assert set(summary["models"]) == {"teacher", "student"} | quantized
    for name, model in summary["models"].items():
        assert model["accuracy"] > 0.3, name  # chance is 0.1
        assert model["size_bytes"] == (run_dir / "models" / name / "model.safetensors").stat().st_size
        assert 0 < model["latency_ms_p50"] <= model["latency_ms_p95"] and model["rows_per_s_b64"] > 0
    models = summary["models"]
    # The sweep picks a width-48 or -64 teacher (118k or 208k params); a width-8 one-block student has 4.5k.
    assert models["student"]["params"] < models["teacher"]["params"] / 4
    assert all(models[q]["params"] == models["student"]["params"] and models[q]["status"] == "accepted" for q in quantized)
    # static_int8 stores convolutions and linears in int8; the others quantize the linears only.
    assert models["student-static_int8"]["size_bytes"] < models["student"]["size_bytes"] / 2.5
    # ... and its measured form is its AOTInductor program, compiled for this machine (quantize.compile).
    compiled = run_dir / "models" / "student-static_int8" / "model.pt2"
    assert models["student-static_int8"]["program"] == "model.pt2" and models["student-static_int8"]["program_bytes"] == compiled.stat().st_size
    assert all("program" not in models[n] for n in models if n != "student-static_int8")
    skipped = summary["stages"]["quantize"]["skipped"]
    assert set(skipped) <= {"int4_weight_only"}
    report = (run_dir / "report.md").read_text()
    assert "| student-static_int8 |" in report and "](models.png)" in report
    assert "student-static_int8 ran its AOTInductor-compiled program (model.pt2, " in report
    assert "student-static_int8 ran its AOTInductor-compiled program" in out  # under the console's table too
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
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2
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
    assert best_config["tune"]["enabled"] is False and best_config["train"]["epochs"] == 2



def test_training_metrics_reach_tensorboard_and_mlflow(quickstart_job):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = quickstart_job
    summary = json.loads((run_dir / "summary.json").read_text())
    student = summary["stages"]["distill"]
    trials = [f"trial-{t['trial'].split('_')[2]}_{t['trial'].split('_')[3]}" for t in summary["stages"]["tune"]["trials"]]
    # TensorBoard: one event directory per training run, the loss and lr at every optimizer step.
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == sorted(["student", *trials])
    events = EventAccumulator(str(run_dir / "tensorboard" / "student")).Reload()
    assert {"train/loss", "train/lr", "val/accuracy", "train/samples_per_s", "epoch"} <= set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars("train/loss")]
    reports = [json.loads(line) for line in (run_dir / "metrics" / "student.jsonl").read_text().splitlines()]
    assert steps == list(range(1, reports[-1]["step"] + 1))  # every step of the run, once
    assert [r["epoch"] for r in reports] == [1, 2, 3]  # distill.epochs
    accuracy = {e.step: e.value for e in events.Scalars("val/accuracy")}
    assert accuracy[student["step"]] == pytest.approx(student["val_accuracy"], abs=1e-6)  # the kept (best) epoch
    assert all(e.value > 0 for e in events.Scalars("train/lr"))
    # MLflow (output.mlflow: true -> the run directory's own store): a run for the pipeline with the
    # config and the final numbers, a nested run per training run with the same curves.
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(run_dir.name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {run_dir.name, "student", *trials}
    parent = runs[run_dir.name]
    assert parent.info.status == "FINISHED" and parent.data.params["train.epochs"] == "2"
    assert parent.data.metrics["student_accuracy"] == pytest.approx(summary["models"]["student"]["accuracy"])
    assert all(runs[n].data.tags["mlflow.parentRunId"] == parent.info.run_id for n in ("student", *trials))
    history = client.get_metric_history(runs["student"].info.run_id, "train_loss_step")
    assert sorted(m.step for m in history) == steps
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "report.html", "report.md"} <= artifacts


def test_report_html_renders_in_chromium_with_its_images(quickstart_job, tmp_path):
    from chromium import CHROMIUM, render

    if CHROMIUM is None:
        skip_or_fail("no chromium: `make test` installs Debian's package where it can (apt-get as root)")
    run_dir, _, _ = quickstart_job
    page = render(run_dir / "report.html", tmp_path / "report.png")
    assert page["title"] == "raylaunch report"
    assert page["headings"] == ["Stages", "Training curves", "Sweep trials", "Models on the test split"]
    # Training curves, the sweep's plot and the models chart, each decoded to its full size.
    assert len(page["images"]) == 3 and all(i["complete"] and i["width"] >= 800 for i in page["images"]), page["images"]
    assert page["tables"] == 3 and page["text"] > 800
    assert (tmp_path / "report.png").stat().st_size > 50_000
