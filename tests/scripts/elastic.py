"""An elastic worker group on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`:
a head with no CPUs and two 1-CPU worker nodes), run as its own process by tests/test_elastic.py.

`train.workers: [1, 2]`: the run starts on 2 workers; one node is removed after the first
checkpoint, and the run goes on with 1 worker from the latest checkpoint; once it has checkpointed
on 1 worker a node is added back, and the group grows to 2 again. Prints one JSON line: every
checkpoint's position, the trace of every micro batch trained, and when the nodes went and came.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from _multinode import Events, print_result, multinode_cluster


def positions(run_dir: Path) -> list[dict]:
    found = []
    for path in run_dir.glob("checkpoint_*/position.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # being written
            pass
    return sorted(found, key=lambda p: p["step"])


def resize(cluster, node, run_dir: Path, events: dict, running: threading.Thread) -> None:
    """Remove `node` after the first checkpoint; once the group has checkpointed on 1 worker, add a
    node. In the main thread: starting a node installs signal handlers."""
    while not positions(run_dir):
        time.sleep(0.1)
    cluster.remove_node(node, allow_graceful=False)
    events["removed_after_step"] = positions(run_dir)[-1]["step"]
    while running.is_alive() and not any(p["workers"] == 1 for p in positions(run_dir)):
        time.sleep(0.1)
    cluster.add_node(num_cpus=1)
    events["added_after_step"] = positions(run_dir)[-1]["step"]


def main(work: Path, data_dir: Path) -> None:
    with multinode_cluster(2) as (cluster, nodes):

        from runconfig.resolved import ResolvedConfig
        from runconfig.schema import RunConfig
        from trainers.fit import build_trainer, fit, load_splits
        from trainers.worker import worker_config

        meta = json.loads((data_dir / "meta.json").read_text())
        splits = load_splits(data_dir)  # streamed: a node that leaves takes no held blocks with it
        run = ResolvedConfig.of(RunConfig.model_validate({
            "model": {"type": "mlp", "width": 32, "depth": 1, "dropout": 0.0},
            "train": {"workers": [1, 2], "epochs": 8, "micro_batch_size": 32, "checkpoint_every": 8, "max_failures": 3,
                      "resize_check_s": 1, "placement_strategy": "SPREAD", "keep_checkpoints": 100},
        }))
        trace = work / "trace"
        trace.mkdir()
        # A pause after each step: the run lasts long enough for a node to go and come back (Ray Train
        # hears of a new node from Ray Data's autoscaling coordinator, which looks every 20 s).
        config = worker_config(run, meta).replace(trace=str(trace), step_pause_s=0.2)
        events: dict = {"steps_per_epoch": config.steps_per_epoch, "total_steps": config.total_steps}
        outcome: dict = {}
        from cluster.raycompat import ReportStream

        told = Events()
        with ReportStream(told) as reports:
            trainer = build_trainer(config, splits, work / "ray", name="elastic", callbacks=[reports.callback()])
            running = threading.Thread(target=lambda: outcome.update(result=fit(trainer, config.train)), daemon=True)
            running.start()
            resize(cluster, nodes[1], work / "ray" / "elastic", events, running)
            running.join()
        events["events"] = told.events
        events["final_step"] = outcome["result"].metrics["step"]
        events["positions"] = positions(work / "ray" / "elastic")
        events["trace"] = [json.loads(line) for log in sorted(trace.glob("rank*.jsonl"))
                           for line in log.read_text().splitlines()]
        print_result(events)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
