"""On a multi-node cluster, a run directory some node cannot see is refused before anything runs.

The cluster is a head and a second node on this machine; the second node runs in a mount namespace
of its own with an empty tmpfs over one folder, so that folder is on "this machine's disk only",
as a local path on a real cluster's head is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import skip_or_fail, start_ray, stop_ray

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def blind_node_cluster(tmp_path):
    """(head, the folder only the head's machine sees)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("needs root and unshare(1) for the second node's own mount namespace")
    local = tmp_path / "local"
    local.mkdir()
    head = start_ray(tmp_path / "head", num_cpus=1)
    try:
        node = start_ray(tmp_path / "node", num_cpus=1, head=head,
                         wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f'mount -t tmpfs tmpfs "{local}" && exec "$0" "$@"'])
    except BaseException:
        stop_ray(head)
        raise
    yield head, local
    stop_ray(node)
    stop_ray(head)


def _run(head: dict, output: Path, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(head["token"])}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--stages", "preprocess",
                           "--set", f"output.dir={output}", "--set", f"data.cache_dir={cache}",
                           "--set", f"cluster.address={head['gcs']}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_node_local_run_directory_is_refused_on_a_multi_node_cluster(blind_node_cluster, tmp_path):
    head, local = blind_node_cluster
    done = _run(head, local / "run", local / "cache")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert re.match(rf"output.dir: {re.escape(str(local / 'run'))} is not on storage every node sees: [\d.]+ \([0-9a-f]{{8}}\) of ", lines[0]), lines[0]
    assert "of this 2-node cluster do not see a file written there" in lines[0] and "NFS" in lines[0]
    assert lines[1].startswith(f"data.cache_dir: {local / 'cache'} is not on storage every node sees")
    assert list(local.iterdir()) == []  # refused before anything was written, the check's marker gone too

    # A folder both nodes see passes, and preprocessing runs across the two nodes.
    shared = tmp_path / "shared"
    done = _run(head, shared / "run", shared / "cache")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "✓ preprocess" in done.stdout and (shared / "run" / "summary.json").exists()
