"""How a sweep's trials pack onto the cluster: every trial is a whole Ray Train worker group, so
a trial reserves `train.workers x train.cpus_per_worker` CPUs (and a GPU per worker with
`train.use_gpu`), and the largest group the search space can sample decides how many run at once.
Pure logic on the config and the cluster's resources, shared by `raylaunch plan` and the tune stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.resources import describe, groups_that_fit, missing_resources, worker_group_demand
from runconfig.schema import RunConfig

# The paths whose values change what a trial's worker group reserves.
GROUP_PATHS = ("train.workers", "train.cpus_per_worker", "train.use_gpu")


@dataclass
class Packing:
    trials: int
    """Trials the sweep starts (before early stopping and the time budget)."""
    demand: dict[str, float]
    """The largest worker group a trial can sample."""
    concurrent: int
    """Trials at once: as many of the largest group as the cluster holds (or tune.max_concurrent_trials, if lower)."""

    @property
    def waves(self) -> int:
        return math.ceil(self.trials / self.concurrent) if self.concurrent else 0

    def line(self, cfg: RunConfig) -> str:
        tune = cfg.tune
        after = {"asha": "; ASHA stops weak trials early, so fewer in practice",
                 "pbt": "; PBT runs the population together, pausing trials in turn if it waits"}.get(tune.scheduler, "")
        return (f"{self.trials} trial(s) ({tune.search} search, {tune.scheduler}), each a worker group of up to "
                f"{describe(self.demand)}: {self.concurrent} at once -> {self.waves} wave(s){after}")


def trial_count(cfg: RunConfig) -> int:
    """Trials Ray Tune starts: every combination of the grid values, num_samples times (or once
    with `search: grid`, where choices are enumerated too)."""
    enumerated = ("choice", "grid") if cfg.tune.search == "grid" else ("grid",)
    combinations = math.prod(len(getattr(d, d.kind)) for d in cfg.tune.space.values() if d.kind in enumerated)
    return combinations * (1 if cfg.tune.search == "grid" else cfg.tune.num_samples)


def largest_demand(cfg: RunConfig) -> dict[str, float]:
    """The most of each resource one trial's worker group can reserve, over the space's values."""
    def values(path: str, default):
        domain = cfg.tune.space.get(path)
        return domain.edge_values() if domain is not None else [default]

    train = cfg.train
    workers = max(values("train.workers", train.max_workers))
    cpus = max(values("train.cpus_per_worker", train.cpus_per_worker))
    return worker_group_demand(int(workers), float(cpus), any(values("train.use_gpu", train.use_gpu)))


def pack(cfg: RunConfig, cluster: dict[str, float]) -> Packing:
    demand = largest_demand(cfg)
    fit = groups_that_fit(cluster, demand)
    limit = cfg.tune.max_concurrent_trials
    return Packing(trials=trial_count(cfg), demand=demand, concurrent=min(limit, fit) if limit else fit)


def packing_problems(cfg: RunConfig, cluster: dict[str, float]) -> list[str]:
    """A sweep whose largest trial the cluster can never hold would wait for it forever: refused,
    with the numbers. (Without a searched group path every trial is the configured group, which
    the pipeline's own worker-group check covers.)"""
    searched = [p for p in GROUP_PATHS if p in cfg.tune.space]
    demand = largest_demand(cfg)
    missing = missing_resources(cluster, demand)
    if not searched or not missing:
        return []
    return [f"tune.space.{searched[0]}: the largest trial the sweep can sample is a worker group of {describe(demand)} "
            f"but the Ray cluster has {describe({k: cluster.get(k, 0.0) for k in demand})} (short by {describe(missing)}); "
            f"lower the largest value searched or add nodes"]
