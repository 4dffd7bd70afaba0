"""The config a run uses: validated, then resolved once after Ray starts, then never changed."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runconfig.schema import RunConfig

REDACTED = "***"


def redacted(dump: dict) -> dict:
    """A config dump with the values of `cluster.job.env_vars` (tokens, passwords) replaced by
    REDACTED: what goes anywhere but the job's own environment (config.yaml, MLflow, Tune's
    experiment state, the workers)."""
    env_vars = ((dump.get("cluster") or {}).get("job") or {}).get("env_vars")
    if not env_vars:
        return dump
    dump = copy.deepcopy(dump)
    dump["cluster"]["job"]["env_vars"] = dict.fromkeys(env_vars, REDACTED)
    return dump


def apply_overrides(dump: dict, values: Mapping[str, Any]) -> dict:
    """A copy of a config dump with each `dotted.path: value` set (a sweep trial's sampled values)."""
    dump = copy.deepcopy(dump)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = dump
        for part in parents:
            node = node[part]
        node[leaf] = value
    return dump


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated config with nothing left to decide: `train.zero.stage` a number (`auto` planned
    against the cluster), the user's DeepSpeed JSON read once (trials and workers may run where its
    file is not), the cluster's resources. config.yaml is written from it; every training run (the
    train and distill stages, each sweep trial) builds its `trainers.worker.WorkerConfig` from it.
    Its `run` is a copy no one else holds: nothing changes it after it is made."""

    run: RunConfig
    deepspeed_user: dict | None = None
    resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.run.train.zero.stage == "auto":
            raise ValueError("a resolved config has a ZeRO stage: resolve train.zero.stage: auto first")

    @classmethod
    def of(cls, run: RunConfig, zero_stage: int | None = None, deepspeed_user: dict | None = None,
           resources: Mapping[str, float] | None = None) -> ResolvedConfig:
        """`run` resolved: a deep copy, with `zero_stage` set where given."""
        run = run.model_copy(deep=True)
        if zero_stage is not None:
            run.train.zero.stage = zero_stage
        return cls(run, deepspeed_user, dict(resources or {}))

    def dump(self) -> dict:
        """The config as plain data, secrets redacted: what config.yaml, MLflow and Tune keep."""
        return redacted(self.run.model_dump(mode="json"))

    def with_overrides(self, values: Mapping[str, Any]) -> ResolvedConfig:
        """A sweep trial's config: its sampled `dotted.path: value`s set, validated again. The job's
        secrets are not needed where trials run, and stay redacted."""
        run = RunConfig.model_validate(apply_overrides(self.dump(), values))
        return ResolvedConfig(run, self.deepspeed_user, self.resources)
