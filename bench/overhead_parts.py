"""bench/train_overhead.py's rl-1w / plain gap for the digits CNN, taken apart in one run.

The CNN trains an epoch in 0.05-0.1 s (steps of about 3 ms), and a raylaunch run validates,
checkpoints and reports at each epoch's end. Which of the pieces between a plain PyTorch loop and
raylaunch costs what: the same rows in memory, model, global batch (64) and epochs, one Ray Train
worker with both CPUs of an embedded Ray as raylaunch starts one, five ways:
  1. torch        the plain loop (torch's AdamW) inside the TorchTrainer, no reports;
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAYS = ["torch", "deepspeed", "metrics", "checkpoint", "raylaunch"]
BATCH = 64


def train_fn(spec: dict) -> None:
    """One Ray Train worker: the plain loop of bench/_loop.py, reporting as `spec["way"]` says.
    Writes each timed epoch's seconds to `spec["out"]`."""
    import ray.train
    import torch
    import torch.nn.functional as F

    from bench.train_overhead import load_rows
    from trainers import import_deepspeed
    from trainers.batches import model_batch
    from trainers.loop import skip_lone_allreduce
    from trainers.models import build_model

    meta, train, way = spec["meta"], spec["train"], spec["way"]
    rows = load_rows(spec["data_dir"], meta)
    count = len(rows["label"])
    torch.manual_seed(0)
    model = build_model(spec["model"], meta["input_shape"], meta["num_classes"])
    if way == "torch":
        optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"],
                                      betas=tuple(train["adam_betas"]), eps=1e-8)
    else:
        model, *_ = import_deepspeed().initialize(model=model, model_parameters=model.parameters(),
                                                  config=spec["deepspeed"])
        skip_lone_allreduce(model)  # as raylaunch's 1 worker does
    seconds = []
    for epoch in range(spec["epochs"]):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(epoch))
        started = time.perf_counter()
        for step in range(count // BATCH):
            x, y = model_batch({k: v[order[step * BATCH:(step + 1) * BATCH]] for k, v in rows.items()}, meta, epoch)
            loss = F.cross_entropy(model(x), y)
            if way == "torch":
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                model.backward(loss)
                model.step()
        seconds.append(time.perf_counter() - started)
        metrics = {"epoch": epoch, "train_loss": loss.item()}
        if way == "metrics":
            ray.train.report(metrics)
        elif way == "checkpoint":
            with tempfile.TemporaryDirectory() as tmp:
                model.save_checkpoint(f"{tmp}/deepspeed", tag="state")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    Path(spec["out"]).write_text(json.dumps({"seconds": seconds, "samples": count // BATCH * BATCH}))


def run_way(way: str, run: dict, meta: dict, data_dir: str, work: Path, name: str, epochs: int) -> float:
    """Steady-state samples/s of one way."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.train_overhead import _steady, loop_config_for, run_raylaunch
    from trainers.fit import poll_interval_s, polled_every

    config = loop_config_for(run, meta, 1, 0, BATCH, epochs)
    if way == "raylaunch":
        return run_raylaunch(run, meta, data_dir, work / "ray", name, 1, 0, BATCH, epochs)["rate"]
    out = work / f"{name}.json"
    spec = {"way": way, "meta": meta, "train": config["train"], "model": run["model"], "data_dir": data_dir,
            "deepspeed": config["deepspeed"], "epochs": epochs, "out": str(out)}
    trainer = TorchTrainer(train_fn, train_loop_config=spec, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                           run_config=RunConfig(name=name, storage_path=str(work / "ray"),
                                                checkpoint_config=CheckpointConfig(num_to_keep=2)))
    with polled_every(poll_interval_s(config)):
        trainer.fit()
    result = json.loads(out.read_text())
    return _steady(result["seconds"], result["samples"])


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
