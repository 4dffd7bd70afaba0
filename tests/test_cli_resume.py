"""`raylaunch run --resume`: a run whose driver was killed continues from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import data_meta
from launcher.cli import main

ROOT = Path(__file__).parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _args(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launcher", "run", QUICKSTART, "--stages", "preprocess,train",
            "--set", f"output.dir={run_dir}", "--set", "train.epochs=3", "--set", "train.checkpoint_every=5",
            "--set", "train.keep_checkpoints=100", "--set", "model.width=8", "--set", "cluster.num_cpus=2"]


def test_resume_continues_a_run_whose_driver_was_killed(tmp_path):
    run_dir = tmp_path / "run"
    # Its own process (and its own embedded Ray), killed like a driver whose machine went away.
    driver = subprocess.Popen(_args(run_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(run_dir.glob("ray/train/checkpoint_*/model.safetensors"))) < 2 and driver.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    # The driver and the embedded Ray it started (its own process group, started above) go at once.
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    done = subprocess.run(_args(run_dir) + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = " ".join(done.stdout.split())
    assert "reused cached" in out and "continuing from the checkpoint at step" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["stages"]["train"]["resumed_from_step"] >= 5
    snapshot = json.loads((run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json").read_text())
    steps = [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]  # ordered by score, not time
    assert len(steps) == len(set(steps))  # no step trained twice: it continued, it did not start over
    meta = data_meta(run_dir)
    assert max(steps) == 3 * (meta["rows"]["train"] // 2 // 32)
    assert (run_dir / "models" / "teacher" / "model.safetensors").exists()


def test_resume_refuses_a_changed_config_or_a_directory_without_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["run", QUICKSTART, "--set", f"output.dir={run_dir}", "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.5}}))
    assert main(["run", QUICKSTART, "--set", f"output.dir={run_dir}", "--resume"]) == 2
    assert "--resume: train.lr was 0.5 in" in capsys.readouterr().err
