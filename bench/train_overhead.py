"""raylaunch's training overhead against raw PyTorch and torchrun, measured in one run.

The same model, the same rows in memory (the cached train split), the same global batch, optimizer
(AdamW, constant lr) and epochs, these ways:
  1. plain    a single-process PyTorch loop, 2 threads, torch's AdamW as a user writes it (its
              default CPU kernel);
  2. rl-1w    raylaunch (Ray Train + DeepSpeed), 1 worker with 2 CPUs, ZeRO-0;
  3. ddp      `torchrun --nproc_per_node 2`, DistributedDataParallel over gloo, 1 thread a rank;
  4. rl-2w-z0, rl-2w-z2, rl-2w-z3   raylaunch, 2 workers of 1 CPU, ZeRO-0, -2 and -3;
and, to tell Ray's and raylaunch's share of (4)'s cost from DeepSpeed's:
  5. ds-z0, ds-z2   the plain loop under `torchrun --nproc_per_node 2` on the DeepSpeed engine
     raylaunch's 2 workers build (the same JSON), ZeRO-0 and -2: DeepSpeed without Ray;
and, to show how much of raylaunch's ratios is the optimizer kernel it picks:
  6. plain-fused, ddp-fused   (1) and (3) with torch's fused AdamW kernel, which raylaunch's CPU
     workers use (trainers.deepspeed_config.cpu_optimizer).
Throughput is steady state: samples/s (tokens/s for the GPT) over every epoch but the first, the
median over rounds that run the ways interleaved. Start-up is reported apart: for the baselines the
seconds to their first optimizer step; for raylaunch the time fit() took beyond its steady-state
training (worker group start, DeepSpeed set-up, data pipeline start, validation and checkpoints).

Each round runs the baselines with no Ray running, as a user of `torchrun` has none, then starts an
embedded Ray for raylaunch's ways and stops it. On 2 cores, an idle Ray beside `torchrun` slows
DeepSpeed's ZeRO-0 by about 4% (bench/RESULTS.md, 2026-12-01 evening), so baselines run beside it would
hide part of what Ray costs. Each round's raylaunch ways run in a fresh Ray. The order of the ways is
reversed every other round, so that a drift of the machine's speed within a round (this VM's speed can
halve within minutes) does not always land on the same side of a ratio.

Cases: `cnn` (the quickstart's digits CNN) and `gpt` (configs/lm.yaml's GPT at its CPU size).
Targets on a 2-core machine: rl-1w / plain >= 0.90; rl-2w-z0 / ddp >= 0.975; rl-2w-z2 / ddp >= 0.85.
Also printed: raylaunch's ways against the fused baselines; ds-z0 / ddp and ds-z2 / ddp (DeepSpeed's
own cost against DDP); rl-2w-z0 / ds-z0 and rl-2w-z2 / ds-z2 (what Ray's own processes, Ray Train,
Ray Data and raylaunch's loop cost on top of the same engine).

    python bench/train_overhead.py [--cases cnn,gpt] [--rounds 3] [--workdir /tmp/raylaunch-bench-overhead]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {
    # config, overrides, global batch, epochs
    # 16 epochs of 19 steps: the CNN trains an epoch in about 0.1 s. With 4, the steady state was 3
    # epochs, a few tenths of a second, and rl-1w varied 3x between rounds (4,064 to 13,258 samples/s).
    "cnn": ("configs/quickstart.yaml", ["train.lr_schedule=constant"], 64, 16),
    "gpt": ("configs/lm.yaml", ["train.lr_schedule=constant", "train.grad_accum_steps=1", "train.warmup_steps=0"], 32, 3),
}
WAYS = ["plain", "plain-fused", "ddp", "ddp-fused", "ds-z0", "ds-z2", "rl-1w", "rl-2w-z0", "rl-2w-z2", "rl-2w-z3"]  # baselines first
TARGETS = {("rl-1w", "plain"): 0.90, ("rl-2w-z0", "ddp"): 0.975, ("rl-2w-z2", "ddp"): 0.85, ("rl-2w-z3", "ddp"): None,
           ("rl-1w", "plain-fused"): None, ("rl-2w-z0", "ddp-fused"): None, ("rl-2w-z2", "ddp-fused"): None,
           ("ds-z0", "ddp"): None, ("ds-z2", "ddp"): None, ("rl-2w-z0", "ds-z0"): None, ("rl-2w-z2", "ds-z2"): None}


def load_rows(data_dir: str, meta: dict) -> dict:
    """The train split in memory as torch tensors (the columns a batch of Ray Data gives a worker)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from dataprep.stream import decode_tensors, parquet_files

    table = pa.concat_tables(decode_tensors(pq.read_table(p)) for p in parquet_files(f"{data_dir}/train"))
    columns = ("tokens",) if meta.get("task") == "lm" else ("features", "label")
    return {c: torch.from_numpy(np.array(table[c].combine_chunks().to_numpy(), copy=True)) for c in columns}


def _steady(epoch_seconds: list[float], items: int) -> float:
    later = epoch_seconds[1:] or epoch_seconds
    return items / statistics.median(later)


def run_baseline(spec: Path, world: int) -> dict:
    from bench._loop import run

    result, wall = run(spec, world, threads=1 if world > 1 else 2)
    rate = _steady(result["epoch_seconds"], result["items_per_epoch"])
    return {"rate": rate, "startup_s": result["first_step_s"], "wall_s": wall}


def loop_config_for(run: dict, meta: dict, workers: int, stage: int, batch: int, epochs: int):
    """raylaunch's WorkerConfig for this run on `workers` workers of the 2 CPUs, at ZeRO `stage`."""
    from runconfig.resolved import ResolvedConfig
    from runconfig.schema import RunConfig
    from trainers.worker import worker_config

    run = json.loads(json.dumps(run))
    run["train"] |= {"workers": workers, "cpus_per_worker": 2 // workers, "micro_batch_size": batch // workers,
                     "epochs": epochs, "keep_checkpoints": epochs, "checkpoint_every": None}
    run["train"]["zero"]["stage"] = stage
    return worker_config(ResolvedConfig.of(RunConfig.model_validate(run)), meta)


def run_raylaunch(run: dict, meta: dict, data_dir: str, storage: Path, name: str, workers: int, stage: int,
                  batch: int, epochs: int) -> dict:
    from trainers.fit import build_trainer, load_splits

    config = loop_config_for(run, meta, workers, stage, batch, epochs)
    started = time.perf_counter()
    splits = load_splits(data_dir, run["data"]["in_memory"], run["data"]["ingest_memory_mb"])  # as the pipeline does
    result = build_trainer(config, splits, storage, name=name).fit()
    wall = time.perf_counter() - started
    history = result.metrics_dataframe
    key = "tokens_per_s" if meta.get("task") == "lm" else "samples_per_s"
    rates = list(history[key])
    rate = statistics.median(rates[1:] or rates)
    items = config.steps_per_epoch * batch * (meta["seq_len"] if meta.get("task") == "lm" else 1)
    return {"rate": rate, "startup_s": wall - epochs * items / rate, "wall_s": wall}


def print_medians(runs: dict[str, list[dict]], targets: dict[tuple[str, str], float | None]) -> dict:
    """Each way's medians over its rounds (rate, start-up, wall), printed with the ratios `targets`
    names (a / b and the target it must reach, or None); returns the medians."""
    medians = {w: {k: statistics.median(o[k] for o in outs) for k in ("rate", "startup_s", "wall_s")}
               for w, outs in runs.items()}
    for way, m in medians.items():
        print(f"  {way:<11} {m['rate']:>10,.0f}   start-up {m['startup_s']:5.1f} s   wall {m['wall_s']:5.1f} s")
    for (a, b), target in targets.items():
        ratio = medians[a]["rate"] / medians[b]["rate"]
        verdict = "" if target is None else (" (target >= %.3f: %s)" % (target, "met" if ratio >= target else "NOT met"))
        print(f"  {a} / {b} = {ratio:.3f}{verdict}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cnn,gpt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/raylaunch-bench-overhead")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work / "ray", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    from cluster.session import quiet_driver_logs, ray_session
    from dataprep.cache import prepare
    from launcher.config import load

    embedded = contextlib.ExitStack()

    def ray_up(up: bool) -> None:
        """An embedded Ray as `raylaunch run` starts one (`ray_session`), or none (for the baselines)."""
        if up and not ray.is_initialized():
            embedded.enter_context(ray_session(None, 2, verbose=False))
        elif not up:
            embedded.close()

    quiet_driver_logs(False)
    print(f"machine: {os.cpu_count()} CPUs; torch threads: plain 2, rl-1w 2, ddp and rl-2w 1 per rank")
    summary = {}
    try:
        for case in args.cases.split(","):
            config_file, overrides, batch, epochs = CASES[case]
            cfg = load(ROOT / config_file, overrides)
            run = cfg.model_dump(mode="json")
            ray_up(True)  # preparing the data runs on Ray Data
            meta, data_dir, _ = prepare(run["data"], cfg.model.seq_len, work / "cache")
            items_per_row = meta["seq_len"] if meta.get("task") == "lm" else 1
            base = {"data_dir": str(data_dir), "meta": meta, "model": run["model"], "train": run["train"],
                    "global_batch": batch, "epochs": epochs, "threads": 1, "items_per_row": items_per_row}
            # one process with both threads; 2 ranks, one each
            docs = {"plain": base | {"threads": 2}, "plain-fused": base | {"threads": 2, "fused": True}, "ddp": base,
                    "ddp-fused": base | {"fused": True}}
            for stage in (0, 2):
                docs[f"ds-z{stage}"] = base | {"deepspeed": loop_config_for(run, meta, 2, stage, batch, epochs).deepspeed}
            baselines = {}  # the plain loop's ways: (spec file, processes)
            for way, doc in docs.items():
                path = work / f"{case}-{way}.json"
                path.write_text(json.dumps(doc))
                baselines[way] = (path, 1 if way.startswith("plain") else 2)
            runs: dict[str, list[dict]] = {w: [] for w in WAYS}
            for r in range(args.rounds):
                ray_up(False)  # every round's raylaunch ways start their workers in a fresh Ray
                # Baselines first in the 1st, 3rd, ... round, raylaunch's ways first in the others: the
                # VM's speed can drift within a round (2x within minutes here, bench/RESULTS.md), and a
                # fixed order would put that drift on one side of every ratio.
                for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                    ray_up(way not in baselines)
                    if way in baselines:
                        out = run_baseline(*baselines[way])
                    else:
                        workers = 1 if way == "rl-1w" else 2
                        stage = 0 if way in ("rl-1w", "rl-2w-z0") else int(way[-1])
                        out = run_raylaunch(run, meta, str(data_dir), work / "ray", f"{case}-{way}-{r}", workers, stage,
                                            batch, epochs)
                    runs[way].append(out)
                    print(f"  {case} round {r + 1} {way:<11} {out['rate']:>10,.0f} items/s  start-up {out['startup_s']:5.1f} s"
                          f"  wall {out['wall_s']:5.1f} s", flush=True)
            unit = "tokens/s" if items_per_row > 1 else "samples/s"
            print(f"\n{case}: global batch {batch}, {epochs} epochs, median of {args.rounds} interleaved rounds ({unit})")
            medians = print_medians(runs, TARGETS)
            summary[case] = {"unit": unit, "medians": medians, "runs": runs}
    finally:
        ray_up(False)
    (work / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
