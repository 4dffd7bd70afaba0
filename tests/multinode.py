"""Running a script of tests/scripts that builds a multi-node Ray cluster on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def run_script(name: str, *args: str, timeout: int = 600) -> dict:
    """`tests/scripts/<name>` with `args`, in its own process (the suite's session Ray is a single
    node, and a process joins one cluster) and its own Ray temp dir (`ray start`-style heads record
    themselves in TMPDIR/ray_current_cluster, which a later plain `ray.init()` on this machine would
    try to join; a short path: Unix sockets). Returns its RESULT line; whatever its cluster left
    behind is stopped with its process group."""
    ray_tmp = tempfile.mkdtemp(prefix="rl-")
    script = subprocess.Popen([sys.executable, str(SCRIPTS / name), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
                              env=os.environ | {"RAY_TMPDIR": ray_tmp}, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(script.pid)
        stdout, stderr = script.communicate()
        raise AssertionError(f"{name} timed out\n" + stdout[-3000:] + stderr[-3000:]) from None
    finally:
        stop_group(script.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert script.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
