"""A driver killed at a random moment (SIGKILL to its process group: the embedded Ray it started
goes with it, mid-step, mid-save or mid-upload, wherever the moment falls), then `raylaunch run
--resume`: the final weights are bitwise those of an uninterrupted run, under ZeRO-1, 2 and 3,
and for the distill stage. (Workers killed at points inside saving and uploading, with Ray Train
restarting the group, are in test_resume_and_faults.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli import main

ROOT = Path(__file__).parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
CHECKPOINTS = 4  # digits: 1,259 train rows / 2 workers / 128 = 4 steps an epoch, 2 epochs, a checkpoint every 2 steps


def _args(run_dir: Path, cache: Path, stage: int, distill: bool) -> list[str]:
    stages = "preprocess,train,distill" if distill else "preprocess,train"
    return ["run", QUICKSTART, "--stages", stages, "--set", f"output.dir={run_dir}", "--set", f"data.cache_dir={cache}",
            "--set", "tune.enabled=false", "--set", "model={type: mlp, width: 16, depth: 1, dropout: 0.1}",
            "--set", f"train.zero.stage={stage}", "--set", "train.epochs=2", "--set", "train.micro_batch_size=128",
            "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=100",
            "--set", "distill.student={type: mlp, width: 8, depth: 1, dropout: 0.1}", "--set", "distill.epochs=2",
            "--set", "distill.teacher_outputs=live"]


def _final(run_dir: Path, experiment: str) -> bytes:
    """The weights of an experiment's last checkpoint (the run's end, whichever scored best)."""
    def step(folder: Path) -> int:
        return json.loads((folder / "position.json").read_text())["step"]

    folders = [p for p in (run_dir / "ray" / experiment).glob("checkpoint_*") if (p / "position.json").exists()]
    return (max(folders, key=step) / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, quickstart_cache, tmp_path_factory):
    """The final weights of uninterrupted runs: ZeRO-1 and 3 training, ZeRO-2 training then distilling."""
    runs = {}
    for stage in (1, 2, 3):
        run_dir = tmp_path_factory.mktemp(f"uninterrupted-{stage}") / "run"
        assert main(_args(run_dir, quickstart_cache, stage, distill=stage == 2)) == 0
        runs[stage] = {"train": _final(run_dir, "train")}
        if stage == 2:
            runs[stage]["distill"] = _final(run_dir, "distill")
    return runs


# Each run is killed twice, at moments its seeds draw: after a number of its experiment's checkpoints
# (counting those written before an earlier kill) and a fraction of a second more.
KILLS = {1: [(0, "train"), (1, "train")], 3: [(2, "train"), (3, "train")], 2: [(4, "train"), (5, "distill")]}


@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2-then-distill", "zero3"])
def test_a_driver_killed_at_random_moments_resumes_to_the_uninterrupted_weights(uninterrupted, quickstart_cache,
                                                                                tmp_path, stage):
    run_dir = tmp_path / "run"
    distill = any(experiment == "distill" for _, experiment in KILLS[stage])
    command = [sys.executable, "-m", "launcher", *_args(run_dir, quickstart_cache, stage, distill),
               "--set", "cluster.num_cpus=2"]
    moments, floor = [], {"train": 0, "distill": 0}
    for i, (seed, experiment) in enumerate(KILLS[stage]):
        rng = random.Random(seed)
        later = sum(e == experiment for _, e in KILLS[stage][i + 1:])  # each needs a checkpoint of its own
        after, extra = rng.randint(floor[experiment] + 1, CHECKPOINTS - 1 - later), rng.uniform(0.0, 1.5)
        floor[experiment] = after
        moments.append(f"{experiment} after {after} checkpoints + {extra:.2f} s")
        driver = subprocess.Popen([*command, *(["--resume"] if len(moments) > 1 else [])], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(list((run_dir / "ray" / experiment).glob("checkpoint_*/model.safetensors"))) < after:
            assert driver.poll() is None and time.monotonic() < deadline, f"no {moments[-1]}"
            time.sleep(0.05)
        time.sleep(extra)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        driver.wait()

    done = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "succeeded"
    expected = uninterrupted[stage]
    assert _final(run_dir, "train") == expected["train"], f"killed {'; '.join(moments)}"
    if distill:
        assert _final(run_dir, "distill") == expected["distill"], f"killed {'; '.join(moments)}"
