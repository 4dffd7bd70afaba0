"""Ray Train's poll interval, chosen per run from how often it reports (trainers.fit.poll_interval_s).
That the run's controller gets it is tests/test_raycompat.py's."""

from __future__ import annotations

import os

from cluster.raycompat import TRAIN_POLL_ENV, polled_every
from cluster.session import worker_env
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig as RaylaunchConfig
from trainers.fit import FAST_POLL_S, SLOW_POLL_S, poll_interval_s
from trainers.worker import WorkerConfig, worker_config


def _loop_config(rows: int, **train) -> WorkerConfig:
    run = RaylaunchConfig.model_validate({"model": {"type": "mlp", "width": 8, "depth": 1},
                                          "train": {"workers": 2} | train})
    return worker_config(ResolvedConfig.of(run), {"rows": {"train": rows}, "input_shape": [4], "num_classes": 3})


def test_a_run_reporting_every_few_micro_batches_polls_fast():
    # The digits at the quickstart's batch: 1,259 rows / 2 workers / 32 = 19 steps, a report each epoch.
    assert poll_interval_s(_loop_config(1259, micro_batch_size=32)) == FAST_POLL_S
    # Long epochs, but a checkpoint every 10 steps.
    assert poll_interval_s(_loop_config(100_000, micro_batch_size=32, checkpoint_every=10)) == FAST_POLL_S


def test_a_run_reporting_rarely_polls_slowly():
    # configs/lm.yaml: a checkpoint every 50 steps of 2 micro-batches each.
    assert poll_interval_s(_loop_config(100_000, micro_batch_size=16, grad_accum_steps=2,
                                        checkpoint_every=50)) == SLOW_POLL_S
    # Epochs of 99 steps (the GPT of bench/train_overhead.py), a report each epoch.
    assert poll_interval_s(_loop_config(3182, micro_batch_size=16)) == SLOW_POLL_S
    # Epochs of 25 steps: fast with one micro-batch a step, slow with two (50 micro-batches a report).
    assert poll_interval_s(_loop_config(800, micro_batch_size=16)) == FAST_POLL_S
    assert poll_interval_s(_loop_config(1600, micro_batch_size=16, grad_accum_steps=2)) == SLOW_POLL_S


def test_an_interval_the_user_set_is_used_by_every_run_and_passed_to_the_job(monkeypatch):
    monkeypatch.setenv(TRAIN_POLL_ENV, "2.0")
    with polled_every(FAST_POLL_S):
        assert os.environ[TRAIN_POLL_ENV] == "2.0"
    assert os.environ[TRAIN_POLL_ENV] == "2.0"
    assert worker_env(None, None)["env_vars"][TRAIN_POLL_ENV] == "2.0"
    monkeypatch.delenv(TRAIN_POLL_ENV)
    assert TRAIN_POLL_ENV not in worker_env(None, None)["env_vars"]  # each run chooses its own
