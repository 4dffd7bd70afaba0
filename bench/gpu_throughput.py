"""GPT training throughput on one GPU, measured in one run: raylaunch (Ray Train + DeepSpeed, one
worker, bf16, ZeRO-2 and ZeRO-3) against the same model in a plain PyTorch bf16 loop.

For each model size and way: tokens/s in steady state (the last epoch: the first holds the warm-up),
MFU = 6 x params x tokens/s / 989e12 (dense bf16 peak of an H100/H200), and the peak GPU memory its
tensors took (torch.cuda.max_memory_allocated; raylaunch's worker reports it). Start-up is printed
apart: for the plain loop the seconds to its first step, for raylaunch the rest of fit()'s wall time
(worker start, DeepSpeed set-up, the data pipeline, validation and two checkpoints). For raylaunch it
also prints how much of the measured epoch the worker spent waiting on Ray Data for its next batch.

Both sides train on the same rows (configs/lm.yaml's data: this Python's library sources, byte tokens
packed into blocks of seq_len + 1), the same micro batch, AdamW (weight decay 0.1), gradient clipping
at 1.0, constant lr. The plain loop holds the rows in GPU memory and runs the model under
torch.autocast(bfloat16) over fp32 weights with torch's fused AdamW. raylaunch streams the rows
through Ray Data and trains with DeepSpeed's bf16 and its FusedAdam, which DeepSpeed builds on first
use (that build lands in the first raylaunch run's start-up). Targets on one H200: raylaunch within
5% of the plain loop; MFU >= 40% at 1B.

Sizes: `350m` (28 layers x 1024), `1b` (20 layers x 2048), and `tiny` (2 x 64), which checks the script
on a machine without a GPU: there both sides train in fp32 on the CPU, DeepSpeed over gloo.

    python bench/gpu_throughput.py [--sizes 350m,1b] [--stages 2,3] [--workdir DIR] [--scratch DIR]

--workdir holds the data cache and Ray Train's storage (each run's checkpoints are deleted once it
is measured); --scratch is the workers' TMPDIR, where DeepSpeed writes a checkpoint before Ray Train
copies it to storage. A 1B checkpoint is about 18 GB (bf16 weights, fp32 master weights and Adam
moments, the consolidated fp32 model), and two of them and a copy in scratch exist at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# model shape, packed block length, micro batch, which library sources make the data
SIZES = {
    "tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "seq_len": 128, "micro": 8, "glob": "asyncio/*.py"},
    "350m": {"n_layer": 28, "d_model": 1024, "n_head": 16, "seq_len": 1024, "micro": 16, "glob": "p*.py"},
    "1b": {"n_layer": 20, "d_model": 2048, "n_head": 16, "seq_len": 1024, "micro": 16, "glob": "p*.py"},
}
PEAK_FLOPS = 989e12
EPOCHS = 2
TARGET_RATIO, TARGET_MFU = 0.95, 0.40


def run_plain(spec: Path, threads: int) -> dict:
    from bench._loop import run

    result, wall = run(spec, 1, threads)
    return {"rate": result["items_per_epoch"] / result["epoch_seconds"][-1], "startup_s": result["first_step_s"],
            "wall_s": wall, "peak_mb": result["gpu_memory_peak_mb"]}


def run_raylaunch(run: dict, meta: dict, data_dir: str, storage: Path, name: str, stage: int, cpus: int,
                  cuda: bool) -> dict:
    from runconfig.resolved import ResolvedConfig
    from runconfig.schema import RunConfig
    from trainers.fit import build_trainer, load_splits
    from trainers.worker import worker_config

    run = json.loads(json.dumps(run))
    run["train"] |= {"workers": 1, "cpus_per_worker": cpus, "use_gpu": cuda, "keep_checkpoints": 1,
                     "checkpoint_every": None}
    run["train"]["zero"]["stage"] = stage
    config = worker_config(ResolvedConfig.of(RunConfig.model_validate(run)), meta)
    started = time.perf_counter()
    try:
        splits = load_splits(data_dir, run["data"]["in_memory"], run["data"]["ingest_memory_mb"])  # as the pipeline does
        result = build_trainer(config, splits, storage, name=name).fit()
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)  # checkpoints of a 1B model are ~18 GB each
    wall = time.perf_counter() - started
    history = result.metrics_dataframe
    rate = float(history["tokens_per_s"].iloc[-1])
    tokens = config.steps_per_epoch * run["train"]["micro_batch_size"] * meta["seq_len"]
    peak = float(history["gpu_memory_peak_mb"].max()) if "gpu_memory_peak_mb" in history else None
    return {"rate": rate, "startup_s": wall - EPOCHS * tokens / rate, "wall_s": wall, "peak_mb": peak,
            "steps_per_epoch": config.steps_per_epoch, "epoch_s": tokens / rate,
            "data_wait_s": float(history["data_wait_s"].iloc[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="350m,1b")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--workdir", default="/tmp/raylaunch-bench-gpu")
    parser.add_argument("--scratch", default=None, help="the workers' TMPDIR (default: the system's)")
    parser.add_argument("--cpus", type=int, default=min(os.cpu_count() or 2, 8), help="CPUs of the Ray worker")
    parser.add_argument("--out", default=None, help="write the results here as JSON after every run")
    parser.add_argument("--glob", default=None, help="library sources to train on instead of each size's own (e.g. "
                        "'*.py': 4.7 MB, about 250 steps an epoch, which makes per-epoch costs small against the steps)")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    from cluster.session import embedded_ray_options, quiet_driver_logs
    from dataprep.cache import prepare
    from launcher.config import load
    from launcher.plan import model_size

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"no GPU ({os.cpu_count()} CPUs)"
    print(f"device: {device}; torch {torch.__version__}; precision {'bf16' if cuda else 'fp32 (CPU check)'}", flush=True)
    quiet_driver_logs(False)
    scratch = {}
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        scratch["TMPDIR"] = args.scratch
    # The data is a few MB: a small object store leaves /dev/shm to the checkpoints (see --scratch).
    ray.init(num_cpus=max(args.cpus, 2), num_gpus=1 if cuda else 0, object_store_memory=2 * 2**30, log_to_driver=False,
             logging_level="error", **embedded_ray_options(**scratch))
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: list[dict] = []
    try:
        for size in args.sizes.split(","):
            shape = SIZES[size]
            overrides = [f"model.{k}={shape[k]}" for k in ("n_layer", "d_model", "n_head", "seq_len")] + [
                f"data.text_glob={args.glob or shape['glob']}", "data.val_fraction=0.1", "data.test_fraction=0.1", "train.lr_schedule=constant", "train.warmup_steps=0",
                "train.grad_accum_steps=1", f"train.micro_batch_size={shape['micro']}", f"train.epochs={EPOCHS}",
                f"train.precision={'bf16' if cuda else 'fp32'}", f"train.use_gpu={str(cuda).lower()}", "train.lr=3e-4"]
            cfg = load(ROOT / "configs" / "lm.yaml", overrides)
            run = cfg.model_dump(mode="json")
            meta, data_dir, _ = prepare(run["data"], shape["seq_len"], work / "cache")
            params, _, _ = model_size(cfg)
            print(f"\n{size}: {params / 1e6:,.1f}M parameters, {meta['rows']['train']} train rows of {meta['seq_len']} "
                  f"tokens, micro batch {shape['micro']}, {EPOCHS} epochs", flush=True)
            spec = work / f"{size}.json"
            spec.write_text(json.dumps({"data_dir": str(data_dir), "meta": meta, "model": run["model"],
                                        "train": run["train"], "global_batch": shape["micro"], "epochs": EPOCHS,
                                        "threads": args.cpus, "items_per_row": meta["seq_len"],
                                        "device": "cuda" if cuda else "cpu", "precision": run["train"]["precision"]}))
            ways = [("plain", None)] + [(f"raylaunch ZeRO-{s}", int(s)) for s in args.stages.split(",")]
            for way, stage in ways:
                try:
                    if stage is None:
                        out = run_plain(spec, args.cpus)
                    else:
                        out = run_raylaunch(run, meta, str(data_dir), work / "ray", f"{size}-z{stage}", stage, args.cpus,
                                            cuda)
                except Exception as exc:  # one way failing (out of memory, say) still leaves the others measured
                    print(f"  {way:<18} failed: {str(exc)[-1500:]}", flush=True)
                    results.append({"size": size, "way": way, "error": str(exc)[-1500:]})
                    continue
                out |= {"size": size, "way": way, "params": params, "mfu": 6 * params * out["rate"] / PEAK_FLOPS}
                results.append(out)
                peak = f"{out['peak_mb'] / 1024:6.1f} GiB" if out["peak_mb"] else "     -"
                print(f"  {way:<18} {out['rate']:>12,.0f} tokens/s  MFU {out['mfu']:6.1%}  peak {peak}  "
                      f"start-up {out['startup_s']:5.1f} s  wall {out['wall_s']:5.1f} s", flush=True)
                if "data_wait_s" in out:
                    print(f"  {'':<18} last epoch {out['epoch_s']:.2f} s for {out['steps_per_epoch']} steps, "
                          f"{out['data_wait_s']:.2f} s of it waiting for batches", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=1))
    finally:
        ray.shutdown()
    print(f"\nsummary ({device}; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s)")
    for size in dict.fromkeys(r["size"] for r in results):
        rows = {r["way"]: r for r in results if r["size"] == size and "error" not in r}
        plain = rows.get("plain")
        for way, r in rows.items():
            line = f"  {size:<5} {way:<18} {r['rate']:>12,.0f} tokens/s  MFU {r['mfu']:6.1%}"
            if plain and way != "plain":
                ratio = r["rate"] / plain["rate"]
                line += f"  / plain = {ratio:.3f} (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})"
            if size == "1b" and cuda:
                line += f"  (MFU target >= {TARGET_MFU:.0%}: {'met' if r['mfu'] >= TARGET_MFU else 'NOT met'})"
            print(line)


if __name__ == "__main__":
    main()
