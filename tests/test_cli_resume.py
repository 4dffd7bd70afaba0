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


def test_resume_refuses_a_changed_config_or_a_directory_raylaunch_did_not_start(tmp_path, capsys):
    from launcher.rundir import claim

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["run", QUICKSTART, "--set", f"output.dir={run_dir}", "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    # A folder that looks like a run but that raylaunch did not start: its checkpoints are not unpickled.
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.5}}))
    assert main(["run", QUICKSTART, "--set", f"output.dir={run_dir}", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"--resume: {run_dir} holds no raylaunch-run.json, so raylaunch did not start it (or an older version did); "
        f"resuming unpickles the run's checkpoints, so only a run raylaunch started can be continued")
    assert claim(str(run_dir)) is None
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


def test_ctrl_c_during_a_sweep_interrupts_the_run_and_says_how_to_continue(quickstart_cache, tmp_path):
    """Tune would catch the SIGINT, end the trials as if finished and let the run go on with them."""
    config = sweep_config(tmp_path, quickstart_cache, {
        "search": "grid", "scheduler": "fifo", "max_concurrent_trials": 1, "space": {"train.lr": {"grid": [3.0e-3, 2.0e-3]}}},
        epochs=20)
    run_dir = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "launcher", "run", config, "--stages", "preprocess,tune,evaluate",
                               "--set", "cluster.num_cpus=2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    reports, deadline = run_dir / "tune" / "reports.jsonl", time.monotonic() + 300
    while not (reports.exists() and reports.read_text().strip()) and driver.poll() is None:
        assert time.monotonic() < deadline, "the first trial reported nothing within 300 s"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, out[-2000:] + err[-2000:]
    assert "raylaunch: interrupted; continue with --resume" in err
    assert "tune" not in json.loads((run_dir / "summary.json").read_text())["stages"]


def test_resume_replaces_a_model_copied_before_the_driver_died_and_refuses_to_read_the_data_otherwise(
        ray_cluster, quickstart_cache, tmp_path, capsys):
    """A driver killed between copying the teacher into models/teacher and recording its stage:
    `--resume` trains the stage to its end again and replaces the copy (the rename onto it used to
    fail). A resume that would read the splits otherwise than the interrupted stage did (held in
    memory, here streamed) is refused before training, saying how to continue exactly."""
    run_dir = tmp_path / "run"
    args = ["run", QUICKSTART, "--stages", "preprocess,train", "--set", f"output.dir={run_dir}",
            "--set", f"data.cache_dir={quickstart_cache}", "--set", "tune.enabled=false", "--set", "train.epochs=1",
            "--set", "model={type: mlp, width: 16, depth: 1}"]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_in_memory"] == {"train": True}
    kept = (run_dir / "models" / "teacher" / "model.safetensors").read_bytes()
    del summary["stages"]["train"]  # what summary.json held when the driver died
    (run_dir / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()

    assert main([*args, "--resume", "--set", "data.in_memory=false"]) == 2
    assert capsys.readouterr().err.strip() == (
        "data.in_memory: the interrupted train stage read its splits held in memory and this run would read them "
        "streamed, which gives each rank other rows; continue it exactly with --set data.in_memory=true")
    assert main([*args, "--resume"]) == 0
    assert "continuing from the checkpoint at step" in " ".join(capsys.readouterr().out.split())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "succeeded"
    assert (run_dir / "models" / "teacher" / "model.safetensors").read_bytes() == kept
    assert not (run_dir / "models" / "teacher.partial").exists()


def test_a_snapshot_in_an_unknown_form_deletes_no_checkpoint(tmp_path):
    """Checkpoint folders missing from Ray Train's snapshot are removed on a resume, but only when
    the snapshot was read and lists checkpoints: a changed format must not delete them all."""
    from rich.console import Console

    from cluster.raycompat import registered_checkpoints
    from launcher.stages import _resume_point

    experiment = tmp_path / "ray" / "train"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_half"):
        (experiment / name).mkdir(parents=True)
    result = {"checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 4, "epoch": 1.0}}
    good = {"checkpoint_results": [result, dict(result, checkpoint_dir_name="checkpoint_b")],
            "latest_checkpoint_result": dict(result, checkpoint_dir_name="checkpoint_b")}
    assert registered_checkpoints(json.dumps(good)) == {"checkpoint_a", "checkpoint_b"}
    unknown = [{"results": good["checkpoint_results"]}, {"checkpoint_results": []},
               {"checkpoint_results": [{"dir": "checkpoint_a"}]}, ["checkpoint_a"]]
    console = Console(file=open(os.devnull, "w"))
    for snapshot in unknown:
        assert registered_checkpoints(json.dumps(snapshot)) is None
        (experiment / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
        assert _resume_point(tmp_path / "ray", "train", console) == {}
        assert sorted(p.name for p in experiment.glob("checkpoint_*/")) == ["checkpoint_a", "checkpoint_b", "checkpoint_half"]
    (experiment / "checkpoint_manager_snapshot.json").write_text("{not json")
    assert registered_checkpoints("{not json") is None and _resume_point(tmp_path / "ray", "train", console) == {}
    (experiment / "checkpoint_manager_snapshot.json").write_text(json.dumps(good))
    assert _resume_point(tmp_path / "ray", "train", console) == {"resumed_from_step": 4}
    assert sorted(p.name for p in experiment.glob("checkpoint_*/")) == ["checkpoint_a", "checkpoint_b"]
