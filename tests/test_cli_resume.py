"""`raylaunch run --resume`: a sweep whose driver was killed continues from its trials' checkpoints.
(A training run whose driver was killed resumes from the checkpoints in an S3 bucket in
test_remote_storage.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import data_meta, sweep_config
from launcher.cli import main

ROOT = Path(__file__).parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_resume_refuses_a_changed_config_or_a_directory_without_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["run", QUICKSTART, "--set", f"output.dir={run_dir}", "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.5}}))
    assert main(["run", QUICKSTART, "--set", f"output.dir={run_dir}", "--resume"]) == 2
    assert "--resume: train.lr was 0.5 in" in capsys.readouterr().err


def test_resume_continues_a_sweep_whose_driver_was_killed(quickstart_cache, tmp_path):
    """Tuner.restore under `--resume`: the finished trial is kept as it was, the one that was running
    continues from its last checkpoint."""
    config = sweep_config(tmp_path, quickstart_cache, {
        "search": "grid", "scheduler": "fifo", "max_concurrent_trials": 1, "space": {"train.lr": {"grid": [3.0e-3, 2.0e-3]}}},
        epochs=2, checkpoint_every=5, keep_checkpoints=100)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "launcher", "run", config, "--stages", "preprocess,tune",
            "--set", "cluster.num_cpus=2"]

    driver = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("ray/trial-*_00001/checkpoint_*/model.safetensors")) and driver.poll() is None:
        assert time.monotonic() < deadline, "the second trial saved no checkpoint within 300 s"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    first = next(run_dir.glob("ray/trial-*_00000"))
    first_checkpoints = sorted(p.name for p in first.glob("checkpoint_*"))
    reports = (run_dir / "tune" / "reports.jsonl").read_text().splitlines()
    first_reports = [r for r in reports if "_00000_" in json.loads(r)["trial"]]

    done = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    trials = summary["stages"]["tune"]["trials"]
    assert summary["status"] == "succeeded" and [t["status"] for t in trials] == ["completed", "completed"]
    # The finished trial did not train again; the interrupted one continued, no step trained twice.
    assert sorted(p.name for p in first.glob("checkpoint_*")) == first_checkpoints
    after = [r for r in (run_dir / "tune" / "reports.jsonl").read_text().splitlines() if "_00000_" in json.loads(r)["trial"]]
    assert after == first_reports
    second = next(run_dir.glob("ray/trial-*_00001"))
    snapshot = json.loads((second / "checkpoint_manager_snapshot.json").read_text())
    steps = [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]
    assert len(steps) == len(set(steps)) and max(steps) == 2 * (data_meta(run_dir)["rows"]["train"] // 64)
    assert (run_dir / "models" / "teacher" / "model.safetensors").exists()
