"""Ray Train's poll interval, chosen per run from how often it reports (trainers.fit.poll_interval_s)
and handed to the run's controller."""

from __future__ import annotations

import os
import tempfile

import ray.train
from ray.train import RunConfig, ScalingConfig

from cluster.session import TRAIN_POLL_ENV, worker_env
from conftest import skip_or_fail
from runconfig.schema import RunConfig as RaylaunchConfig
from trainers.fit import FAST_POLL_S, SLOW_POLL_S, _Trainer, poll_interval_s, polled_every
from trainers.loop import loop_config


def _loop_config(rows: int, **train) -> dict:
    run = RaylaunchConfig.model_validate({"model": {"type": "mlp", "width": 8, "depth": 1},
                                          "train": {"workers": 2} | train}).model_dump(mode="json")
    return loop_config(run, {"rows": {"train": rows}, "input_shape": [4], "num_classes": 3})


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


def test_the_run_s_controller_gets_the_interval_and_the_caller_s_environment_is_restored(ray_cluster, tmp_path):
    if TRAIN_POLL_ENV in os.environ:
        skip_or_fail(f"{TRAIN_POLL_ENV} is set in this environment")

    def report_interval():
        # Ray Train hands its controller's RAY_TRAIN_* variables on to the workers. A run's result
        # holds the metrics reported with its last checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            ray.train.report({"poll": os.environ.get(TRAIN_POLL_ENV)},
                             checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer = _Trainer(report_interval, scaling_config=ScalingConfig(num_workers=1),
                       run_config=RunConfig(name="poll", storage_path=str(tmp_path)), poll_s=SLOW_POLL_S)
    assert trainer.fit().metrics["poll"] == str(SLOW_POLL_S)
    assert TRAIN_POLL_ENV not in os.environ
