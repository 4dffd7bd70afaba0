"""Node loss on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head with
no CPUs and three 1-CPU worker nodes), run as its own process by tests/test_node_loss.py.

1. Two 1-CPU workers spread over two nodes; one node is removed after the first checkpoint: Ray
   Train restarts the group on the nodes left and the run finishes every step.
2. The same on the two nodes left: removing one leaves 1 CPU for a 2-CPU group, and the run fails
   within a bounded time naming the missing resources.
Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

# Read by Ray Train's controller, a process the raylets below start: set before they start.
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"

import ray  # noqa: E402
from _multinode import print_result, multinode_cluster  # noqa: E402


def remove_after_first_checkpoint(cluster, node, run_dir: Path, removed: dict) -> threading.Thread:
    def watch():
        while not list(run_dir.glob("checkpoint_*/model.safetensors")):
            time.sleep(0.2)
        cluster.remove_node(node, allow_graceful=False)
        removed["at"] = time.monotonic()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def alive_nodes_once_settled(expected: int, within_s: float = 30) -> int:
    """The nodes the GCS holds alive, once it agrees with `expected` or `within_s` passed. Ray Train
    hears of the lost worker first (its process is gone): a run can recover and end before the
    GCS's health checks (4 misses of 1 s) declare the node itself dead."""
    deadline = time.monotonic() + within_s
    while True:
        alive = len([n for n in ray.nodes() if n["Alive"]])
        if alive == expected or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def main(work: Path, data_dir: Path | None) -> None:
    started = time.monotonic()
    with multinode_cluster(3) as (cluster, nodes):

        from dataprep.cache import prepare
        from runconfig.schema import RunConfig
        from trainers.fit import WorkerGroupUnplaceable, build_trainer, fit, load_splits
        from runconfig.resolved import ResolvedConfig
        from trainers.worker import worker_config

        if data_dir is None:
            data = RunConfig().model_dump(mode="json")["data"] | {"transforms": [{"type": "standardize", "per": "feature"}]}
            meta, data_dir, _ = prepare(data, 128, work / "cache")
        else:  # the test suite's own preprocessed digits
            meta = json.loads((data_dir / "meta.json").read_text())
        # The workers stream the cached Parquet files (zero-CPU read tasks): a node that leaves
        # takes no dataset blocks with it that would need a free CPU to rebuild.
        splits = load_splits(data_dir)
        run = ResolvedConfig.of(RunConfig.model_validate({
            "model": {"type": "mlp", "width": 32, "depth": 1},
            "train": {"workers": 2, "epochs": 1, "micro_batch_size": 64, "checkpoint_every": 2, "max_failures": 1,
                      "placement_strategy": "SPREAD", "keep_checkpoints": 50},
        }))
        config = worker_config(run, meta)
        report = {"expected_steps": config.total_steps}

        removed: dict = {}
        watcher = remove_after_first_checkpoint(cluster, nodes[1], work / "ray" / "recover", removed)
        result = fit(build_trainer(config, splits, work / "ray", name="recover"), config.train)
        watcher.join(timeout=5)
        report["recovered"] = {"node_removed": "at" in removed, "final_step": result.metrics["step"],
                               "nodes_left": alive_nodes_once_settled(4 - ("at" in removed)),
                               "seconds": round(time.monotonic() - started, 1)}

        removed = {}
        watcher = remove_after_first_checkpoint(cluster, nodes[2], work / "ray" / "fail", removed)
        try:
            fit(build_trainer(config, splits, work / "ray", name="fail"), config.train)
            report["too_little_left"] = {"error": None}
        except WorkerGroupUnplaceable as exc:
            report["too_little_left"] = {"error": str(exc), "seconds_after_removal": time.monotonic() - removed["at"]}
        print_result(report)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
