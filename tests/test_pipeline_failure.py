"""A run that fails inside Ray: one line on stderr, exit 1, and a summary.json that says where and why."""

from __future__ import annotations

import json
import re
from pathlib import Path

from launcher.cli import main

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_diverging_training_fails_the_run_with_its_reason(ray_cluster, quickstart_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Adam moves every weight by ~lr on its first step: at 1e30 the next forward pass overflows.
    code = main(["run", str(QUICKSTART), "--stages", "preprocess,train", "--set", f"output.dir={run_dir}",
                 "--set", f"data.cache_dir={quickstart_cache}",
                 "--set", "train.lr=1e30", "--set", "train.epochs=2", "--set", "train.checkpoint_every=1",
                 "--set", "train.keep_checkpoints=10"])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert "✓ preprocess" in captured.out and "✗ train" in captured.out
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "training diverged" in error_lines[0] and "train.lr" in error_lines[0]
    bad_step = int(re.search(r"at step (\d+) \(epoch 1, micro batch \d+\)", error_lines[0]).group(1))
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


def test_failure_line_keeps_the_workers_own_error():
    from launcher.pipeline import failure_line

    wrapped = RuntimeError("Training failed.\nTraceback (most recent call last):\n  File \"loop.py\", line 3\n"
                           "FloatingPointError: training diverged\n")
    assert failure_line(wrapped) == "FloatingPointError: training diverged"
    assert failure_line(OSError("disk full")) == "OSError: disk full"
    assert failure_line(ValueError("")) == "ValueError"


def test_on_nan_skip_drops_bad_batches_and_finishes(digits_data, tmp_path):
    from launcher.config import RunConfig
    from trainers.fit import build_trainer, load_splits
    from trainers.loop import loop_config

    data_dir, meta = digits_data
    run = RunConfig.model_validate({"model": {"type": "mlp", "width": 16, "depth": 1},
                                    "train": {"workers": 2, "epochs": 1, "micro_batch_size": 128, "lr": 1e30,
                                              "on_nan": "skip"}}).model_dump(mode="json")
    config = loop_config(run, meta)
    result = build_trainer(config, load_splits(data_dir), tmp_path, name="skip").fit()
    # The first updates make every later loss non-finite: those batches are skipped, nothing hangs.
    assert result.metrics["skipped_batches"] > 0
    assert result.metrics["step"] + result.metrics["skipped_batches"] == config["steps_per_epoch"]
