"""A run that fails inside Ray: one line on stderr, exit 1, and a summary.json that says where and why."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import main

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_diverging_training_fails_the_run_with_its_reason(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Adam moves every weight by ~lr on its first step: at 1e30 the next forward pass overflows.
    code = main(["run", str(QUICKSTART), "--stages", "preprocess,train", "--set", f"output.dir={run_dir}",
                 "--set", "train.lr=1e30", "--set", "train.epochs=2"])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert "✓ preprocess" in captured.out and "✗ train" in captured.out
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "training diverged" in error_lines[0] and "train.lr" in error_lines[0]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["failed_stage"] == "train"
    assert "training diverged" in summary["error"]
    assert "preprocess" in summary["stages"] and "train" not in summary["stages"]
    assert not (run_dir / "models" / "teacher").exists()
    assert "failed" in (run_dir / "report.md").read_text()


def test_failure_line_keeps_the_workers_own_error():
    from launcher.pipeline import failure_line

    wrapped = RuntimeError("Training failed.\nTraceback (most recent call last):\n  File \"loop.py\", line 3\n"
                           "FloatingPointError: training diverged\n")
    assert failure_line(wrapped) == "FloatingPointError: training diverged"
    assert failure_line(OSError("disk full")) == "OSError: disk full"
    assert failure_line(ValueError("")) == "ValueError"
