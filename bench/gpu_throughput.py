"""GPT training throughput on one GPU, measured in one run of at most `--budget-s` seconds
(8 minutes by default): raylaunch (Ray Train + DeepSpeed, one worker, bf16, ZeRO-2 and ZeRO-3)
against the same model in a plain PyTorch bf16 loop, 1B first, then 350M while time is left.

Each way trains one epoch of at least 200 optimizer steps, so per-epoch costs are small against the
steps. Steady state is the second half of the epoch: the plain loop times it between two device
syncs; raylaunch checkpoints at the half (its stall is measured and printed apart) and its worker
reports each later step's time (the profiled step left out). Printed for each: tokens/s, MFU =
6 x params x tokens/s / 989e12 (dense bf16 peak of an H100/H200), peak GPU memory, start-up, and
for raylaunch the step times' spread (median, p90, slowest), the seconds spent waiting on Ray Data,
the mid-epoch checkpoint's stall, and a torch.profiler summary of one step: the operators with the
most self CUDA time, the GPU's idle time between kernels, and the host-device syncs torch's sync
debug mode saw in it.

Both sides train on the same rows (configs/lm.yaml's data: this Python's library sources, byte
tokens packed into blocks of seq_len + 1), the same micro batch, AdamW (weight decay 0.1), clipping
at 1.0, constant lr. The plain loop holds the rows in GPU memory and runs under
torch.autocast(bfloat16) over fp32 weights with torch's fused AdamW. raylaunch streams the rows
through Ray Data and trains with DeepSpeed's bf16 and its FusedAdam, which DeepSpeed builds on first
use (in the first raylaunch run's start-up). Targets: raylaunch ZeRO-2 >= 0.95 and ZeRO-3 >= 0.85
of the plain loop at 1B, MFU >= 40% at 1B for ZeRO-2.

Sizes: `1b` (20 layers x 2048), `350m` (28 x 1024), and `tiny` (2 x 64), which checks the whole
script on a machine without a GPU (both sides in fp32 on the CPU, DeepSpeed over gloo; the figures
mean nothing there).

    python bench/gpu_throughput.py [--sizes 1b,350m] [--stages 2,3] [--budget-s 480] [--out FILE]

--workdir holds the data cache and Ray Train's storage (each run's checkpoints are deleted once it
is measured); --scratch is the workers' TMPDIR, where DeepSpeed writes a checkpoint before Ray Train
copies it to storage. A 1B checkpoint is about 18 GB (bf16 weights, fp32 master weights and Adam
moments, the consolidated fp32 model).
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

# model shape, packed block length, micro batch, which library sources make the data (at least 200
# optimizer steps an epoch: `*.py` is about 4.7 MB of byte tokens)
SIZES = {
    "tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "seq_len": 128, "micro": 8, "glob": "asyncio/*.py"},
    "350m": {"n_layer": 28, "d_model": 1024, "n_head": 16, "seq_len": 1024, "micro": 16, "glob": "*.py"},
    "1b": {"n_layer": 20, "d_model": 2048, "n_head": 16, "seq_len": 1024, "micro": 16, "glob": "*.py"},
}
PEAK_FLOPS = 989e12
MIN_STEPS = 200
TARGETS = {2: 0.95, 3: 0.85}  # raylaunch / plain at 1B, by ZeRO stage
TARGET_MFU = 0.40


def run_plain(spec: Path, threads: int) -> dict:
    from bench._loop import run

    result, wall = run(spec, 1, threads)
    return {"rate": result["items_steady"] / result["seconds_steady"], "startup_s": result["first_step_s"],
            "wall_s": wall, "peak_mb": result["gpu_memory_peak_mb"]}


def run_raylaunch(run: dict, meta: dict, data_dir: str, storage: Path, name: str, stage: int, cpus: int,
                  cuda: bool) -> dict:
    from cluster.raycompat import ReportStream
    from runconfig.resolved import ResolvedConfig
    from runconfig.schema import RunConfig
    from trainers.fit import build_trainer, load_splits
    from trainers.worker import steps_per_epoch, worker_config

    run = json.loads(json.dumps(run))
    run["train"] |= {"workers": 1, "cpus_per_worker": cpus, "use_gpu": cuda, "keep_checkpoints": 1}
    run["train"]["zero"]["stage"] = stage
    half = steps_per_epoch(RunConfig.model_validate(run).train, meta["rows"]["train"]) // 2
    # A checkpoint at the half: its stall is reported with the epoch's end, whose window is the
    # steady state; one step of that window is profiled.
    run["train"]["checkpoint_every"] = half
    config = worker_config(ResolvedConfig.of(RunConfig.model_validate(run)), meta).replace(profile_step=half + 10)
    reports: list[dict] = []
    started, fit_called = time.perf_counter(), time.time()
    try:
        splits = load_splits(data_dir, run["data"]["in_memory"], run["data"]["ingest_memory_mb"])  # as the pipeline does
        with ReportStream(reports.append) as stream:
            build_trainer(config, splits, storage, name=name, callbacks=[stream.callback()]).fit()
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)  # checkpoints of a 1B model are ~18 GB each
    wall = time.perf_counter() - started
    # The report after the one at the half (at 2 x half: the epoch's end, or a step before it).
    first, last = reports[0], next(r for r in reports if "profile" in r)
    # The steady state: the window after the mid-epoch checkpoint, its profiled step left out.
    times = [s for i, s in enumerate(last["step_seconds"]) if i != config.profile_step - half - 1]
    return {"rate": run["train"]["micro_batch_size"] * meta["seq_len"] * len(times) / sum(times), "wall_s": wall,
            "startup_s": first["startup"]["first_step"] - fit_called,  # the worker's clock is this machine's
            "peak_mb": last.get("gpu_memory_peak_mb"), "steps_per_epoch": config.steps_per_epoch,
            "step_p50_s": last["step_time_p50_s"], "step_p90_s": last["step_time_p90_s"],
            "step_max_s": last["step_time_max_s"], "data_wait_s": last["data_wait_s"],
            "window_s": sum(last["step_seconds"]), "checkpoint_stall_s": last.get("checkpoint_stall_s"),
            "epoch_start_wait_s": first.get("epoch_start_wait_s"),
            "profile": last["profile"]}


def print_profile(profile: dict) -> None:
    device = profile["device"]
    line = f"    profiled step {profile['wall_ms']:.1f} ms"
    if device.get("kernels"):
        line += (f"; GPU busy {device['busy_ms']:.1f} of {device['span_ms']:.1f} ms ({device['busy_fraction']:.1%}), "
                 f"{device['gaps_over_100us']} gaps over 100 us, largest {device['largest_gaps_ms']} ms")
    if "syncs" in profile:
        line += f"; {profile['syncs']} host-device syncs {profile['sync_sites']}"
    print(line, flush=True)
    unit = "CUDA" if profile["sorted_by"] == "self_device_time_total" else "CPU"
    print(f"    top operators by self {unit} time (calls, self CUDA ms, self CPU ms):", flush=True)
    for name, calls, device_ms, cpu_ms in profile["top_ops"]:
        print(f"      {name[:60]:<60} {calls:>5} {device_ms:>9.2f} {cpu_ms:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,350m")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="start no way that the time left cannot hold (the plain loop's time x 3 + 90 s, "
                             "for raylaunch); the skipped ones are printed")
    parser.add_argument("--workdir", default="/tmp/raylaunch-bench-gpu")
    parser.add_argument("--scratch", default=None, help="the workers' TMPDIR (default: the system's)")
    parser.add_argument("--cpus", type=int, default=min(os.cpu_count() or 2, 8), help="CPUs of the Ray worker")
    parser.add_argument("--out", default=None, help="write the results here as JSON after every run")
    args = parser.parse_args()
    began = time.perf_counter()
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

    def record(out: dict) -> None:
        results.append(out)
        if args.out:
            Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=1))

    try:
        for size in args.sizes.split(","):
            shape = SIZES[size]
            overrides = [f"model.{k}={shape[k]}" for k in ("n_layer", "d_model", "n_head", "seq_len")] + [
                f"data.text_glob={shape['glob']}", "data.val_fraction=0.05", "data.test_fraction=0.05",
                "train.lr_schedule=constant", "train.warmup_steps=0", "train.grad_accum_steps=1",
                f"train.micro_batch_size={shape['micro']}", "train.epochs=1", f"train.precision={'bf16' if cuda else 'fp32'}",
                f"train.use_gpu={str(cuda).lower()}", "train.lr=3e-4"]
            cfg = load(ROOT / "configs" / "lm.yaml", overrides)
            run = cfg.model_dump(mode="json")
            meta, data_dir, _ = prepare(run["data"], shape["seq_len"], work / "cache")
            params, _, _ = model_size(cfg)
            steps = meta["rows"]["train"] // shape["micro"]
            print(f"\n{size}: {params / 1e6:,.1f}M parameters, {meta['rows']['train']} train rows of {meta['seq_len']} "
                  f"tokens, micro batch {shape['micro']}: {steps} steps in the epoch", flush=True)
            if steps < MIN_STEPS:
                raise SystemExit(f"{size}: {steps} steps an epoch, fewer than {MIN_STEPS}: choose more data")
            spec = work / f"{size}.json"
            spec.write_text(json.dumps({"data_dir": str(data_dir), "meta": meta, "model": run["model"],
                                        "train": run["train"], "global_batch": shape["micro"], "epochs": 1,
                                        "steady_from": steps // 2, "threads": args.cpus,
                                        "items_per_row": meta["seq_len"], "device": "cuda" if cuda else "cpu",
                                        "precision": run["train"]["precision"]}))
            plain_s = None
            for way, stage in [("plain", None)] + [(f"raylaunch ZeRO-{s}", int(s)) for s in args.stages.split(",")]:
                left = args.budget_s - (time.perf_counter() - began)
                needed = 60 if stage is None else (3 * plain_s + 90 if plain_s else 120)
                if left < needed:
                    print(f"  {way:<18} skipped: {left:.0f} s of the budget left, about {needed:.0f} s needed", flush=True)
                    record({"size": size, "way": way, "skipped": f"time budget ({left:.0f} s left)"})
                    continue
                try:
                    if stage is None:
                        out = run_plain(spec, args.cpus)
                        plain_s = out["wall_s"]
                    else:
                        out = run_raylaunch(run, meta, str(data_dir), work / "ray", f"{size}-z{stage}", stage, args.cpus,
                                            cuda)
                except Exception as exc:  # one way failing (out of memory, say) still leaves the others measured
                    print(f"  {way:<18} failed: {str(exc)[-1500:]}", flush=True)
                    record({"size": size, "way": way, "error": str(exc)[-1500:]})
                    continue
                out |= {"size": size, "way": way, "stage": stage, "params": params,
                        "mfu": 6 * params * out["rate"] / PEAK_FLOPS}
                record(out)
                peak = f"{out['peak_mb'] / 1024:6.1f} GiB" if out["peak_mb"] else "     -"
                print(f"  {way:<18} {out['rate']:>12,.0f} tokens/s  MFU {out['mfu']:6.1%}  peak {peak}  "
                      f"start-up {out['startup_s']:5.1f} s  wall {out['wall_s']:5.1f} s", flush=True)
                if stage is not None:
                    stall = out["checkpoint_stall_s"]
                    print(f"    steps: median {out['step_p50_s'] * 1e3:.1f} ms, p90 {out['step_p90_s'] * 1e3:.1f} ms, "
                          f"slowest {out['step_max_s'] * 1e3:.1f} ms; waiting on Ray Data {out['data_wait_s']:.2f} s of "
                          f"{out['window_s']:.1f} s; mid-epoch checkpoint stalled training "
                          f"{'-' if stall is None else f'{stall:.1f}'} s; the epoch's first batch waited "
                          f"{out['epoch_start_wait_s']:.2f} s", flush=True)
                    print_profile(out["profile"])
    finally:
        ray.shutdown()
    print(f"\nsummary ({device}; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s; {time.perf_counter() - began:.0f} s in all)")
    for size in dict.fromkeys(r["size"] for r in results):
        rows = {r["way"]: r for r in results if r["size"] == size and "rate" in r}
        plain = rows.get("plain")
        for way, r in rows.items():
            line = f"  {size:<5} {way:<18} {r['rate']:>12,.0f} tokens/s  MFU {r['mfu']:6.1%}"
            if plain and way != "plain":
                ratio, target = r["rate"] / plain["rate"], TARGETS.get(r["stage"])
                line += f"  / plain = {ratio:.3f}"
                if size == "1b" and target:
                    line += f" (target >= {target}: {'met' if ratio >= target else 'NOT met'})"
            if size == "1b" and cuda and r.get("stage") == 2:
                line += f"  (MFU target >= {TARGET_MFU:.0%}: {'met' if r['mfu'] >= TARGET_MFU else 'NOT met'})"
            print(line)


if __name__ == "__main__":
    main()
