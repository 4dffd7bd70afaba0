"""bench/train_overhead.py's rl-1w / plain gap for the digits CNN, taken apart in one run.

The CNN trains an epoch in 0.05-0.1 s (steps of about 3 ms), and a raylaunch run validates,
checkpoints and reports at each epoch's end. Which of the pieces between a plain PyTorch loop and
raylaunch costs what: the same rows in memory, model, global batch (64) and epochs, one Ray Train
worker with both CPUs of an embedded Ray as raylaunch starts one, five ways:
  1. torch        bench/_loop.py's plain loop (torch's AdamW) inside the TorchTrainer, no reports;
  2. deepspeed    the same loop on the DeepSpeed engine raylaunch's 1 worker builds (the same JSON);
  3. metrics      (2), plus `ray.train.report(metrics)` at each epoch's end;
  4. checkpoint   (2), plus DeepSpeed's checkpoint written and reported with each epoch's metrics;
  5. raylaunch    raylaunch's own loop (`trainers.loop`), which also validates each epoch and writes
                  its model files beside DeepSpeed's checkpoint.
Every way's controller polls at the interval raylaunch picks for this run (`poll_interval_s`).
Throughput is steady state, as in train_overhead.py: samples/s over every epoch but the first, timed
around the training steps only (the reports and checkpoints fall between the timed windows; what
they cost shows in the steps after them). Rounds run the ways interleaved. Printed: each way's median,
and the median over rounds of its ratio to the way above and to `torch` in the same round (a VM's
speed can drift over the minutes a run takes; the ways of one round run close together).

    python bench/overhead_parts.py [--rounds 5] [--epochs 96] [--workdir /tmp/raylaunch-bench-parts]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAYS = ["torch", "deepspeed", "metrics", "checkpoint", "raylaunch"]
BATCH = 64


def train_fn(spec: dict) -> None:
    """One Ray Train worker: bench/_loop.py's plain loop on `spec`, reporting after each epoch as
    `spec["way"]` says. Writes the loop's result to `spec["out"]`."""
    import ray.train

    from bench._loop import train

    def report(model, epoch: int) -> None:
        if spec["way"] == "metrics":
            ray.train.report({"epoch": epoch})
        elif spec["way"] == "checkpoint":
            with tempfile.TemporaryDirectory() as tmp:
                model.save_checkpoint(f"{tmp}/deepspeed", tag="state")
                ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    Path(spec["out"]).write_text(json.dumps(train(spec, after_epoch=report)))


def run_way(way: str, run: dict, meta: dict, data_dir: str, work: Path, name: str, epochs: int) -> float:
    """Steady-state samples/s of one way."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.train_overhead import _steady, loop_config_for, run_raylaunch
    from cluster.raycompat import polled_every
    from trainers.fit import poll_interval_s

    if way == "raylaunch":
        return run_raylaunch(run, meta, data_dir, work / "ray", name, 1, 0, BATCH, epochs)["rate"]
    config = loop_config_for(run, meta, 1, 0, BATCH, epochs)
    out = work / f"{name}.json"
    # bench/_loop.py's spec, as train_overhead.py writes it for its plain way (2 threads, one process).
    spec = {"way": way, "out": str(out), "data_dir": data_dir, "meta": meta, "model": run["model"],
            "train": config.train.model_dump(mode="json"), "global_batch": BATCH, "epochs": epochs, "threads": 2, "items_per_row": 1}
    if way != "torch":
        spec["deepspeed"] = config.deepspeed
    trainer = TorchTrainer(train_fn, train_loop_config=spec, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                           run_config=RunConfig(name=name, storage_path=str(work / "ray"),
                                                checkpoint_config=CheckpointConfig(num_to_keep=2)))
    with polled_every(poll_interval_s(config)):
        trainer.fit()
    result = json.loads(out.read_text())
    return _steady(result["epoch_seconds"], result["items_per_epoch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=96)
    parser.add_argument("--workdir", default="/tmp/raylaunch-bench-parts")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work / "ray", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    from cluster.session import quiet_driver_logs, ray_session
    from dataprep.cache import prepare
    from launcher.config import load

    quiet_driver_logs(False)
    cfg = load(ROOT / "configs/quickstart.yaml", ["train.lr_schedule=constant"])
    run = cfg.model_dump(mode="json")
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    print(f"machine: {os.cpu_count()} CPUs; the digits CNN, 1 worker of 2 CPUs, global batch {BATCH}, {args.epochs} epochs")
    with ray_session(None, 2, verbose=False):
        meta, data_dir, _ = prepare(run["data"], None, work / "cache")
        for r in range(args.rounds):
            for way in WAYS:
                rates[way].append(run_way(way, run, meta, str(data_dir), work, f"{way}-{r}-{os.getpid()}", args.epochs))
                print(f"  round {r + 1} {way:<10} {rates[way][-1]:>8,.0f} samples/s", flush=True)
    medians = {way: statistics.median(values) for way, values in rates.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print(f"\n{args.rounds} interleaved rounds: median samples/s; median of the rounds' ratios to the way above and to torch")
    for i, way in enumerate(WAYS):
        above = f"{ratio(way, WAYS[i - 1]):6.3f}" if i else "      "
        print(f"  {way:<10} {medians[way]:>8,.0f}   {above}   {ratio(way, 'torch'):6.3f}")
    (work / "results.json").write_text(json.dumps({"rates": rates, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
