"""A run that fails inside Ray: one line on stderr, exit 1, and a summary.json that says where and why."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_diverging_training_fails_the_run_with_its_reason(ray_cluster, quickstart_cache, tmp_path):
    """As a user meets it: the CLI in a process of its own (joining the session's Ray), stdout and
    stderr holding raylaunch's lines only."""
    import ray

    run_dir = tmp_path / "run"
    # Adam moves every weight by ~lr on its first step: at 1e30 the next forward pass overflows.
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--stages", "preprocess,train",
         "--set", f"output.dir={run_dir}", "--set", f"data.cache_dir={quickstart_cache}", "--set", "tune.enabled=false",
         "--set", "train.lr=1e30", "--set", "train.epochs=2", "--set", "train.checkpoint_every=1",
         "--set", "train.keep_checkpoints=10", "--set", f"cluster.address={ray.get_runtime_context().gcs_address}"],
        cwd=QUICKSTART.parent.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    out = [line for line in done.stdout.splitlines() if line.strip()]
    assert out[0].startswith("raylaunch: ") and out[1].startswith("✓ preprocess") and out[2].startswith("✗ train"), out
    assert len(out) == 3, done.stdout
    error, hint = done.stderr.strip().splitlines()
    assert error.startswith("error: ") and "training diverged" in error and "train.lr" in error
    assert hint == f"see {run_dir}/summary.json; rerun with --verbose for the full trace"
    bad_step = int(re.search(r"at step (\d+) \(epoch 1, micro batch \d+\)", error).group(1))
    assert bad_step >= 2  # step 1 ran from sane weights; its update blew them up

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["failed_stage"] == "train"
    assert "training diverged" in summary["error"]
    assert "preprocess" in summary["stages"] and "train" not in summary["stages"]
    assert not (run_dir / "models" / "teacher").exists()
    kept = sorted((run_dir / "ray" / "train").glob("checkpoint_*/model.safetensors"))
    assert len(kept) == bad_step - 1  # the checkpoints before the loss went bad are all still there
    assert "failed" in (run_dir / "report.md").read_text()


def test_failure_line_keeps_the_workers_own_error_and_every_problem_of_bad_input():
    from dataprep import DataError
    from launcher.errors import failure_line
    from trainers.deepspeed_config import DeepSpeedConfigError

    wrapped = RuntimeError("Training failed.\nTraceback (most recent call last):\n  File \"loop.py\", line 3\n"
                           "FloatingPointError: training diverged\n")
    assert failure_line(wrapped) == "FloatingPointError: training diverged"
    assert failure_line(OSError("disk full")) == "OSError: disk full"
    assert failure_line(ValueError("")) == "ValueError"
    # Every layer's bad input is one kind of error, its problems one line each.
    assert failure_line(DataError(["a.csv, row 2: bad", "b.csv: not a readable CSV file (x\n)"])) == \
        "a.csv, row 2: bad; b.csv: not a readable CSV file (x)"
    assert isinstance(DeepSpeedConfigError(["train.deepspeed_config: x"]), ValueError)


def test_on_nan_skip_drops_bad_batches_and_finishes(digits_data, tmp_path):
    from runconfig.schema import RunConfig
    from trainers.fit import build_trainer, load_splits
    from runconfig.resolved import ResolvedConfig
    from trainers.worker import worker_config

    data_dir, meta = digits_data
    run = ResolvedConfig.of(RunConfig.model_validate({"model": {"type": "mlp", "width": 16, "depth": 1},
                                    "train": {"workers": 2, "epochs": 1, "micro_batch_size": 128, "lr": 1e30,
                                              "on_nan": "skip"}}))
    config = worker_config(run, meta)
    result = build_trainer(config, load_splits(data_dir), tmp_path, name="skip").fit()
    # The first updates make every later loss non-finite: those batches are skipped, nothing hangs.
    assert result.metrics["skipped_batches"] > 0
    assert result.metrics["step"] + result.metrics["skipped_batches"] == config.steps_per_epoch
