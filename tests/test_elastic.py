"""An elastic worker group (`train.workers: [min, max]`) on a real multi-node Ray cluster (several
raylets on this machine): it shrinks when a node leaves and grows when one comes back, each time
continuing from the latest checkpoint on the new worker count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from test_node_loss import _stop_group

SCRIPT = Path(__file__).parent / "scripts" / "elastic.py"


def test_a_worker_range_shrinks_when_a_node_leaves_and_grows_when_it_comes_back(digits_data, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rl-")  # as test_node_loss: a cluster of its own, in a process of its own
    script = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(digits_data[0])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
                              env=os.environ | {"RAY_TMPDIR": ray_tmp}, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        _stop_group(script.pid)
        stdout, stderr = script.communicate()
        raise AssertionError("elastic script timed out\n" + stdout[-3000:] + stderr[-3000:]) from None
    finally:
        _stop_group(script.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert script.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    report = json.loads(lines[0].removeprefix("RESULT "))
    assert report["final_step"] == report["total_steps"]

    # The worker count of each checkpoint: 2, then 1 once the node left, then 2 again once it came back.
    counts = [p["workers"] for p in report["positions"]]
    changes = [count for i, count in enumerate(counts) if i == 0 or count != counts[i - 1]]
    assert changes == [2, 1, 2], counts
    steps = [p["step"] for p in report["positions"]]
    assert steps == sorted(steps) and steps[-1] == report["total_steps"]

    # Each group after the first began at the step after the latest checkpoint before it: no older one.
    per_epoch = report["steps_per_epoch"]
    groups: dict[int, list[int]] = {}  # a worker process -> the steps it trained
    for record in report["trace"]:
        groups.setdefault(record["pid"], []).append(record["epoch"] * per_epoch + record["epoch_step"] + 1)
    starts = sorted({min(trained) for trained in groups.values()})
    assert starts[0] == 1 and len(starts) == 3, starts  # the first group, the shrunk one, the grown one
    for start in starts[1:]:
        taken_before = [s for s in steps if s < start]
        assert taken_before and start == taken_before[-1] + 1, (start, steps)
