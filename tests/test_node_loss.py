"""Losing a node mid-run, on a real multi-node Ray cluster (several raylets on this machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "node_loss.py"


def test_node_loss_recovers_or_fails_clearly(digits_data, tmp_path):
    # Its own process (the suite's session Ray is a single node, and a process joins one cluster),
    # with its own Ray temp dir: `ray start`-style heads record themselves in TMPDIR/ray_current_cluster,
    # which a later plain `ray.init()` on this machine would try to join. Short path: Unix sockets.
    ray_tmp = tempfile.mkdtemp(prefix="rl-")
    script = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(digits_data[0])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
                              env=os.environ | {"RAY_TMPDIR": ray_tmp}, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        _stop_group(script.pid)
        stdout, stderr = script.communicate()
        raise AssertionError("node-loss script timed out\n" + stdout[-3000:] + stderr[-3000:]) from None
    finally:
        _stop_group(script.pid)  # whatever its cluster left behind is in its process group
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert script.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    report = json.loads(lines[0].removeprefix("RESULT "))

    recovered = report["recovered"]
    assert recovered["node_removed"] and recovered["nodes_left"] == 3  # head + 2 worker nodes
    assert recovered["final_step"] == report["expected_steps"]

    failed = report["too_little_left"]
    assert failed["error"] is not None
    assert "the cluster now has 1 CPU (short by 1 CPU)" in failed["error"]
    # Two 10 s placement attempts (the first try and max_failures=1 retry) plus restarts: bounded.
    assert failed["seconds_after_removal"] < 120
    print(f"node loss: the recovered run took {recovered['seconds']} s from the cluster's start; the failing one "
          f"ended {failed['seconds_after_removal']:.1f} s after its node left")


def _stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
