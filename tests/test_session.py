"""The embedded Ray a run starts for itself (cluster.session.ray_session)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# In a process of its own: the suite's cluster (conftest) is already connected in this one, and
# ray_session joins a connection it finds instead of starting one.
CODE = """
import json, os, psutil, ray
from cluster.session import ray_session
@ray.remote
def pid():
    return os.getpid()
with ray_session(None, 1, verbose=False):
    started = sorted(p.name() for p in psutil.Process().children(recursive=True))
    task_pid = ray.get(pid.remote())
print(json.dumps({"started": started, "task_pid": task_pid}))
"""


def test_an_embedded_ray_starts_no_worker_process_its_runs_cannot_use():
    # Ray prestarts idle workers without the run's runtime_env; no task of the run could use them.
    done = subprocess.run([sys.executable, "-c", CODE], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert "raylet" in out["started"] and "gcs_server" in out["started"]
    assert "ray::IDLE" not in out["started"], out["started"]
    assert out["task_pid"] > 0  # a task still gets a worker, started for it
