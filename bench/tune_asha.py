"""ASHA against FIFO on the same sampled configurations, measured in one run.

Digits (scikit-learn's 1,797 8x8 images) and the quickstart's CNN teacher; random search over
`train.lr` and `model.width` with a fixed seed, so both sweeps draw the same configurations (the
scheduler does not change what is sampled); 1-worker trials, as many at once as the CPUs hold.
Both sweeps run in this process on one embedded local Ray, FIFO first. For each: total
worker-epochs trained, the sweep's wall time, the best trial's validation accuracy and the test
accuracy of the checkpoint it picked (the pipeline's evaluate stage). Target (issue 5): ASHA spends
at most half FIFO's worker-epochs and its best test accuracy is within 0.5 points of FIFO's.

    python bench/tune_asha.py [--samples 16] [--epochs 8] [--workdir /tmp/raylaunch-bench-tune]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sweep(scheduler: str, args, workdir: Path) -> dict:
    from rich.console import Console

    from launcher.config import load
    from launcher.pipeline import run_pipeline

    run_dir = workdir / scheduler
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load(ROOT / "configs" / "quickstart.yaml", [
        f"output.dir={run_dir}", f"data.cache_dir={workdir / 'cache'}", "train.workers=1", f"train.epochs={args.epochs}",
        f"tune.scheduler={scheduler}", f"tune.num_samples={args.samples}", "tune.grace_period=1", "tune.reduction_factor=2",
        "tune.space={train.lr: {loguniform: [3.0e-4, 1.0e-2]}, model.width: {choice: [8, 16, 32]}}"])
    summary = run_pipeline(cfg, ["preprocess", "tune", "evaluate"], Console(quiet=True))
    tune = summary["stages"]["tune"]
    trials = tune["trials"]
    return {"scheduler": scheduler, "trials": len(trials), "stopped_early": sum(t["status"] == "stopped early" for t in trials),
            "failed": sum(t["status"] == "error" for t in trials),
            "worker_epochs": sum(t["epochs_run"] for t in trials) * cfg.train.workers,
            "wall_s": tune["seconds"], "best_val_accuracy": tune["best_metrics"]["val_accuracy"],
            "best_test_accuracy": summary["models"]["teacher"]["accuracy"], "best_values": tune["best_values"],
            "configs": sorted((round(t["train.lr"], 8), t["model.width"]) for t in trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/raylaunch-bench-tune"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import ray

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="error")
    try:
        fifo, asha = sweep("fifo", args, args.workdir), sweep("asha", args, args.workdir)
    finally:
        ray.shutdown()
    assert fifo["configs"] == asha["configs"], "the two sweeps sampled different configurations"

    print(f"{args.samples} configurations x {args.epochs} epochs, 1-worker trials, {os.cpu_count()} CPUs")
    print(f"{'':<10}{'worker-epochs':>14}{'wall s':>9}{'stopped':>9}{'failed':>8}{'best val':>10}{'its test':>10}")
    for r in (fifo, asha):
        print(f"{r['scheduler']:<10}{r['worker_epochs']:>14}{r['wall_s']:>9.0f}{r['stopped_early']:>9}{r['failed']:>8}"
              f"{r['best_val_accuracy']:>10.4f}{r['best_test_accuracy']:>10.4f}")
    epochs_ratio = asha["worker_epochs"] / fifo["worker_epochs"]
    points = 100 * (fifo["best_test_accuracy"] - asha["best_test_accuracy"])
    print(f"ASHA / FIFO: worker-epochs {epochs_ratio:.2f}x (target <= 0.50), wall {asha['wall_s'] / fifo['wall_s']:.2f}x; "
          f"best test accuracy {points:+.2f} points below FIFO (target <= 0.50)")
    print("RESULT " + json.dumps({"fifo": fifo, "asha": asha, "worker_epochs_ratio": epochs_ratio,
                                  "test_points_below_fifo": points}))


if __name__ == "__main__":
    main()
