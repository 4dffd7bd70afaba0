"""What the multi-node scripts share: a cluster of raylets on this machine, and the worker-group
events a run's reports tell."""

from __future__ import annotations

import json
from contextlib import contextmanager

from cluster.raycompat import EMBEDDED_SYSTEM_CONFIG


@contextmanager
def multinode_cluster(nodes: int):
    """A `ray.cluster_utils.Cluster` (a head with no CPUs and `nodes` 1-CPU worker nodes) this process
    is connected to while inside, and its worker nodes; shut down on the way out. The GCS declares a node dead after missing health checks:
    every 1 s, 4 misses (Ray's default is every 3 s, 5 misses: 15 s before Ray Train hears of a lost
    worker). And the worker-pool settings of raylaunch's embedded Ray (no idle workers prestarted,
    idle workers kept for 60 s): nothing the tests check depends on them, and they run faster with
    them (bench/RESULTS.md, "2026-12-02 (03:00)")."""
    import ray
    from ray.cluster_utils import Cluster

    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "_system_config": health | EMBEDDED_SYSTEM_CONFIG})
    workers = [cluster.add_node(num_cpus=1) for _ in range(nodes)]
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="error")
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


class Events:
    """The worker-group events the run's reports tell (launcher.live.training_events), as the CLI
    records them in summary.json."""

    def __init__(self):
        self.events, self.workers = [], None

    def __call__(self, item: dict) -> None:
        from launcher.live import training_events

        self.events += training_events(item, self.workers)
        self.workers = item.get("workers", self.workers)


def print_result(report: dict) -> None:
    print("RESULT " + json.dumps(report), flush=True)
