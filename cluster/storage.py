"""Whether the run's folders are storage every node of the cluster reaches.

On a multi-node cluster, Ray Train's workers save checkpoints to the run directory from their own
nodes, preprocessing tasks write the data cache from theirs, and the student's workers read the
teacher from it. A path on one machine's disk breaks all of that, late and confusingly; it is
refused before anything runs. Each node is asked, by a task pinned to it, whether it sees a marker
file the driver just wrote: what a node sees is the only reliable answer (an NFS mount and a local
folder look alike from here).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.exists(path)


def nodes_missing(folders: dict[str, Path]) -> tuple[int, dict[str, list[str]]]:
    """The number of alive nodes and, for each named folder (e.g. {"output.dir": run_dir}), the
    addresses of the nodes that do not see it (none on a single node). Folders not created yet are
    checked at their nearest existing parent, where the run will create them."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return len(nodes), {name: [] for name in folders}
    missing = {}
    for name, folder in folders.items():
        marker = _nearest_existing(Path(folder)) / f".raylaunch-visible-{uuid.uuid4().hex}"
        try:
            marker.touch()
        except OSError as exc:
            missing[name] = [f"this machine ({exc.strerror})"]
            continue
        try:
            checks = [_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                      .remote(str(marker)) for n in nodes]
            missing[name] = [n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})" for n, seen in zip(nodes, ray.get(checks))
                             if not seen]
        finally:
            marker.unlink(missing_ok=True)
    return len(nodes), missing
