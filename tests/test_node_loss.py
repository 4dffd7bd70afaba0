"""Losing a node mid-run, on a real multi-node Ray cluster (several raylets on this machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "node_loss.py"


def test_node_loss_recovers_or_fails_clearly(tmp_path):
    # Its own process: the suite's session Ray is a single node, and a process joins one cluster.
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[0].removeprefix("RESULT "))

    recovered = report["recovered"]
    assert recovered["node_removed"] and recovered["nodes_left"] == 3  # head + 2 worker nodes
    assert recovered["final_step"] == report["expected_steps"]

    failed = report["too_little_left"]
    assert failed["error"] is not None
    assert "the cluster now has 1 CPU (short by 1 CPU)" in failed["error"]
    # Two 15 s placement attempts (the first try and max_failures=1 retry) plus restarts: bounded.
    assert failed["seconds_after_removal"] < 120
