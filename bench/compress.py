"""Compression on the quickstart, from one run: teacher -> distilled student -> quantized students.

Runs configs/quickstart.yaml whole (sweep, distillation, every quantization method, evaluation)
on an embedded local Ray, or reads a finished run with --run-dir, and prints the ratios against
issue 6's targets:
  - the student has at least 4x fewer parameters than the teacher;
  - a quantized student is within 2 accuracy points of the teacher (test split),
    has at least 2x lower batch-1 CPU latency than the teacher,
    and a file at least 3.5x smaller than the fp32 student's.
Latencies are the evaluate stage's, on the models as `load_model` returns them (the deployable
form): eager PyTorch for the fp32 and torchao models, and for static_int8 its AOTInductor program
(`model.pt2`, `quantize.compile`), whose int8 kernels are how a PT2E program is meant to run
(eagerly it executes reference quantize/dequantize ops); p50 of batch-1 calls, the models in turns over
3 rounds of 0.2 s (`trainers.evaluate.interleaved_latency`), the median round. The
targets are judged on these. For context, measured here in this process as well: every eager model
compiled with torch.compile (inductor), the same form as the compiled program.

    python bench/compress.py [--run-dir DIR] [--workdir /tmp/raylaunch-bench-compress]
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

TARGETS = {"params": 4.0, "drop_points": 2.0, "latency": 2.0, "size": 3.5}


def run_quickstart(workdir: Path) -> Path:
    from rich.console import Console

    from launcher.config import load
    from launcher.pipeline import run_pipeline

    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load(ROOT / "configs" / "quickstart.yaml", [f"output.dir={run_dir}", f"data.cache_dir={workdir / 'cache'}"])
    run_pipeline(cfg, cfg.default_stages(), Console())
    return run_dir


def compiled_numbers(run_dir: Path, models: dict) -> dict:
    """batch-1 latency and batch-64 throughput of each model compiled with inductor."""
    import torch

    from trainers.evaluate import first_rows, latency
    from trainers.modeldir import CompiledProgram, load_model

    data_dir = Path(json.loads((run_dir / "data.json").read_text())["path"])
    meta = json.loads((data_dir / "meta.json").read_text())
    example = first_rows(data_dir / "test", meta, 64)
    numbers = {}
    for name in models:
        model, _ = load_model(run_dir / "models" / name, compiled=True)  # the programs this bench's run compiled
        if isinstance(model, CompiledProgram):  # compiled ahead of time already
            numbers[name] = {**latency(model, example), "compile_s": 0.0}
            continue
        # The models share CNN.forward: without a reset, dynamo's per-function recompile limit would
        # silently leave the later ones eager.
        torch._dynamo.reset()
        with torch.inference_mode():
            started = time.perf_counter()
            compiled = torch.compile(model)
            compiled(example[:1])
            compiled(example)
            seconds = time.perf_counter() - started
            numbers[name] = {**latency(compiled, example), "compile_s": seconds}
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished quickstart run to measure instead of running one")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/raylaunch-bench-compress"))
    args = parser.parse_args()

    import logging

    import ray
    from rich import box
    from rich.console import Console
    from rich.table import Table

    for name in ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    console = Console()
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="error")
    try:
        started = time.perf_counter()
        if args.run_dir:
            run_dir = args.run_dir
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)
            run_dir = run_quickstart(args.workdir)
        pipeline_s = time.perf_counter() - started
        summary = json.loads((run_dir / "summary.json").read_text())
        models = summary["models"]
        compiled = compiled_numbers(run_dir, models)
    finally:
        ray.shutdown()

    teacher, student = models["teacher"], models["student"]
    quantized = {n: m for n, m in models.items() if "status" in m}  # the ones the quantize gate judged
    table = Table(title=f"Compression on the quickstart ({run_dir})", box=box.SIMPLE_HEAD, collapse_padding=True)
    for column in ("model", "test acc", "params", "KiB", "b1 p50 ms", "b1 p95 ms", "b64 rows/s", "compiled b1 ms",
                   "compiled b64 rows/s"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    for name, m in models.items():
        c = compiled[name]
        table.add_row(name + (" (model.pt2)" if str(m.get("program", "")).endswith(".pt2") else ""),
                      f"{m['accuracy']:.4f}", f"{m['params']:,}", f"{m['size_bytes'] / 1024:.1f}",
                      f"{m['latency_ms_p50']:.3f}", f"{m['latency_ms_p95']:.3f}", f"{m['rows_per_s_b64']:,.0f}",
                      f"{c['latency_ms_p50']:.3f}", f"{c['rows_per_s_b64']:,.0f}")
    console.print(table)

    params_ratio = teacher["params"] / student["params"]
    lines = [f"params teacher/student: {params_ratio:.2f}x (target >= {TARGETS['params']:g}x) "
             f"{'met' if params_ratio >= TARGETS['params'] else 'NOT met'}"]
    for name, m in quantized.items():
        drop = (teacher["accuracy"] - m["accuracy"]) * 100
        exported = teacher["latency_ms_p50"] / m["latency_ms_p50"]
        same_form = compiled["teacher"]["latency_ms_p50"] / compiled[name]["latency_ms_p50"]
        size = student["size_bytes"] / m["size_bytes"]
        met = [drop <= TARGETS["drop_points"], exported >= TARGETS["latency"], size >= TARGETS["size"]]
        lines.append(
            f"{name}: {drop:+.2f} points below the teacher ({'met' if met[0] else 'NOT met'}); batch-1 latency "
            f"{exported:.2f}x lower than the teacher's, both as exported ({'met' if met[1] else 'NOT met'}; with both "
            f"compiled: {same_form:.2f}x); file {size:.2f}x smaller than the fp32 student ({'met' if met[2] else 'NOT met'})")
    console.print("\n".join(lines), highlight=False)
    skipped = summary["stages"].get("quantize", {}).get("skipped", {})
    for method, reason in skipped.items():
        console.print(f"{method}: skipped: {reason}", highlight=False)
    console.print(f"pipeline {pipeline_s:.0f} s; compile times: "
                  + ", ".join(f"{n} {c['compile_s']:.1f} s" for n, c in compiled.items()), highlight=False)


if __name__ == "__main__":
    main()
