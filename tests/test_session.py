"""The embedded Ray a run starts for itself (cluster.session.ray_session)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# In a process of its own: the suite's cluster (conftest) is already connected in this one, and
# ray_session joins a connection it finds instead of starting one.
CODE = """
import json, os, time, psutil, ray
from cluster.session import ray_session
@ray.remote(num_cpus=0)
def pid():
    return os.getpid()
@ray.remote(num_cpus=1)
class Hold:
    def ready(self):
        return True
with ray_session(None, 1, verbose=False):
    started = sorted(p.name() for p in psutil.Process().children(recursive=True))
    task_pid = ray.get(pid.remote())
    hold = Hold.remote()
    ray.get(hold.ready.remote())  # every CPU is leased, as while the ranks train
    time.sleep(3)  # idle for longer than Ray's default 1 s
    later_task_pid = ray.get(pid.remote())
print(json.dumps({"started": started, "task_pid": task_pid, "later_task_pid": later_task_pid}))
"""


@pytest.fixture(scope="module")
def embedded():
    done = subprocess.run([sys.executable, "-c", CODE], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_an_embedded_ray_starts_no_worker_process_its_runs_cannot_use(embedded):
    # Ray prestarts idle workers without the run's runtime_env; no task of the run could use them.
    assert "raylet" in embedded["started"] and "gcs_server" in embedded["started"]
    assert "ray::IDLE" not in embedded["started"], embedded["started"]
    assert embedded["task_pid"] > 0  # a task still gets a worker, started for it


def test_an_idle_worker_serves_the_next_task_while_every_cpu_is_leased(embedded):
    # With Ray's default, the worker is ended after 1 s idle and the next task pays a new process.
    assert embedded["later_task_pid"] == embedded["task_pid"]
