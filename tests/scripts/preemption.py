"""A preempted node on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head
with no CPUs and three 1-CPU worker nodes), run as its own process by tests/test_preemption.py.

Two workers on two of the nodes. Mid-epoch, the node of one is drained as a cloud preempts a spot
instance (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` with a deadline), and removed at
the deadline. `train.max_failures` is 0: only as a preemption may the run go on. Prints one JSON line:
every checkpoint's position and metrics, the trace of every micro batch trained, and when the drain
was asked for and when the node went.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# Read by Ray Train's controller, a process the raylets below start: set before they start.
os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"

from _multinode import Events, print_result, multinode_cluster  # noqa: E402

DEADLINE_S = 8


def trace(folder: Path) -> list[dict]:
    records = []
    for log in sorted(folder.glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # being written
                pass
    return records


def preempt(cluster, nodes, folder: Path, steps_per_epoch: int, events: dict, running: threading.Thread) -> None:
    """Once the group is well into its second epoch, drain a node one of its workers is on, then
    remove it at the deadline. In the main thread: removing a node uses signals."""
    while running.is_alive():
        records = trace(folder)
        if any(r["epoch"] == 1 and r["epoch_step"] >= steps_per_epoch // 3 for r in records):
            break
        time.sleep(0.1)
    victim = next(n for n in nodes if n.node_id == records[-1]["node"])
    events["drained_at"] = time.time()
    events["drained_after_step"] = max(r["epoch"] * steps_per_epoch + r["epoch_step"] + 1 for r in trace(folder))
    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                    "--node-id", victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", str(DEADLINE_S)],
                   check=True, capture_output=True)
    time.sleep(max(0.0, events["drained_at"] + DEADLINE_S - time.time()))
    cluster.remove_node(victim, allow_graceful=False)
    events["removed_at"] = time.time()


def main(work: Path, data_dir: Path) -> None:
    with multinode_cluster(3) as (cluster, nodes):

        from runconfig.resolved import ResolvedConfig
        from runconfig.schema import RunConfig
        from trainers.fit import build_trainer, fit, load_splits
        from trainers.worker import worker_config

        meta = json.loads((data_dir / "meta.json").read_text())
        splits = load_splits(data_dir)
        run = ResolvedConfig.of(RunConfig.model_validate({
            "model": {"type": "mlp", "width": 32, "depth": 1, "dropout": 0.0},
            "train": {"workers": 2, "epochs": 3, "micro_batch_size": 32, "max_failures": 0, "preemption_check_steps": 2,
                      "placement_strategy": "SPREAD", "keep_checkpoints": 100},
        }))
        folder = work / "trace"
        folder.mkdir()
        config = worker_config(run, meta).replace(trace=str(folder), step_pause_s=0.1)
        events: dict = {"steps_per_epoch": config.steps_per_epoch, "total_steps": config.total_steps,
                        "deadline_s": DEADLINE_S}
        outcome: dict = {}
        from cluster.raycompat import ReportStream

        told = Events()
        reports = ReportStream(told).__enter__()
        trainer = build_trainer(config, splits, work / "ray", name="preempted", callbacks=[reports.callback()])

        def train():
            try:
                outcome["result"] = fit(trainer, config.train)
            except Exception as exc:  # noqa: BLE001 - reported in the result line
                outcome["error"] = repr(exc)[:2000]

        running = threading.Thread(target=train, daemon=True)
        running.start()
        preempt(cluster, nodes, folder, config.steps_per_epoch, events, running)
        running.join()
        reports.__exit__(None, None, None)
        events["events"] = told.events
        events["error"] = outcome.get("error")
        result = outcome.get("result")
        events["final_step"] = result.metrics["step"] if result else None
        events["checkpoints"] = sorted(
            ({"step": m["step"], "workers": json.loads(Path(c.path, "position.json").read_text())["workers"],
              "preemption": m.get("preemption")} for c, m in (result.best_checkpoints if result else [])),
            key=lambda c: c["step"])
        events["trace"] = [{k: r[k] for k in ("pid", "node", "epoch", "epoch_step", "time")} for r in trace(folder)]
        print_result(events)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
