"""Sizing worker groups against what the cluster has. Pure functions, tested without Ray."""

from __future__ import annotations

import math


def worker_group_demand(workers: int, cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """Resources one Ray Train worker group reserves."""
    demand = {"CPU": workers * cpus_per_worker}
    if use_gpu:
        demand["GPU"] = float(workers)
    return demand


def missing_resources(cluster: dict[str, float], demand: dict[str, float]) -> dict[str, float]:
    """What `demand` asks for beyond the cluster's total; empty when it fits."""
    return {k: v - cluster.get(k, 0.0) for k, v in demand.items() if v > cluster.get(k, 0.0) + 1e-9}


def groups_that_fit(cluster: dict[str, float], demand: dict[str, float]) -> int:
    """How many whole worker groups the cluster holds at once (0 when not even one)."""
    return min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0)


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))
