"""Time from `raylaunch run` to the first training step, on an embedded local Ray with warm caches,
and where it goes.

A first run warms everything a user's second run finds warm: the data cache, DeepSpeed's compiled
op, Python's bytecode. Then `--rounds` timed runs of the same command, each a fresh process:

    raylaunch run configs/quickstart.yaml --stages preprocess,train --set train.epochs=1 ...

The split comes from the run's own records: summary.json's timeline (the driver's wall-clock
times: pipeline start, Ray ready, each stage's start) and the first training report's `startup`
(rank 0's: train function entered, DeepSpeed engine ready, first batch, first optimizer step).
Target: <= 20 s with warm caches.

    python bench/first_step.py [--config configs/quickstart.yaml] [--rounds 3] [--workdir DIR] [--set PATH=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 20.0
PARTS = [  # (label, from, to): consecutive, so they add up to the total
    ("process start, imports, config", "spawn", "start"),
    ("Ray start (embedded)", "start", "ray_ready"),
    ("preflight, preprocess (cached)", "ray_ready", "train_start"),
    ("Ray Train: controller, worker group, datasets", "train_start", "loop_start"),
    ("worker: model, DeepSpeed import + initialize", "loop_start", "engine_ready"),
    ("worker: first batch from Ray Data", "engine_ready", "first_batch"),
    ("worker: first step", "first_batch", "first_step"),
]


def one_run(config: str, work: Path, name: str, cache: Path, sets: list[str]) -> dict[str, float]:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "launcher", "run", config, "--stages", "preprocess,train",
               "--set", f"output.dir={out}", "--set", f"data.cache_dir={cache}", "--set", "train.epochs=1",
               "--set", "output.tensorboard=false", *[arg for s in sets for arg in ("--set", s)]]
    spawn = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"raylaunch run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    times = {"spawn": spawn, **json.loads((out / "summary.json").read_text())["timeline"]}
    reports = (out / "metrics").glob("*.jsonl")
    first = next(json.loads(line) for f in reports for line in f.read_text().splitlines() if "startup" in line)
    return times | first["startup"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/raylaunch-bench-first-step")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="more config overrides")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    print(f"machine: {os.cpu_count()} CPUs; config {args.config}; warming the caches ...", flush=True)
    one_run(args.config, work, "warm", cache, args.set)
    rounds = []
    for r in range(args.rounds):
        times = one_run(args.config, work, f"run-{r}", cache, args.set)
        rounds.append({label: times[b] - times[a] for label, a, b in PARTS} | {"total": times["first_step"] - times["spawn"]})
        print(f"  round {r + 1}: {rounds[-1]['total']:.1f} s to the first step", flush=True)
    print(f"\nfrom `raylaunch run` to the first training step, median of {args.rounds} runs with warm caches:")
    for label, *_ in PARTS:
        print(f"  {label:<48} {statistics.median(x[label] for x in rounds):5.1f} s")
    total = statistics.median(x["total"] for x in rounds)
    print(f"  {'total':<48} {total:5.1f} s  (target <= {TARGET_S:.0f} s: {'met' if total <= TARGET_S else 'NOT met'})")
    (work / "results.json").write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
