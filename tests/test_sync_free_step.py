"""A training step does not wait on the device: counted on CPU workers (where a sync costs nothing
and so cannot be timed), raylaunch's own code reads values back once per optimizer step, whatever
the accumulation, never per micro batch; each report carries the step times' spread, and a profiled
step's summary."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig
from trainers.fit import build_trainer, load_splits
from trainers.loop import step_time_spread
from trainers.profiling import busy_and_gaps
from trainers.syncaudit import SyncAudit
from trainers.worker import worker_config


def test_the_audit_counts_reads_inside_a_step_on_its_thread_only():
    methods = {name: vars(torch.Tensor).get(name) for name in ("item", "tolist", "__bool__")}
    audit = SyncAudit().install()
    try:
        t = torch.ones(3)
        t.sum().item()  # outside a step: not counted
        with audit.step(micro_batches=2):
            t.sum().item()
            t.tolist()
            if t.sum() > 0:  # a branch on a tensor's value
                pass
            other = threading.Thread(target=lambda: t.sum().item())
            other.start()
            other.join()
    finally:
        audit.uninstall()
    here = "tests/test_sync_free_step.py:test_the_audit_counts_reads_inside_a_step_on_its_thread_only"
    assert audit.result() == {"steps": 1, "micro_batches": 2,
                              "calls": {f"{here} Tensor.item": 1, f"{here} Tensor.tolist": 1, f"{here} Tensor.__bool__": 1}}
    assert {name: vars(torch.Tensor).get(name) for name in methods} == methods  # uninstalled as they were


def test_kernel_gaps_merge_overlapping_kernels_and_rank_the_idle_time():
    # microseconds: two overlapping kernels, a 200 us gap, a kernel, a 50 us gap, a kernel
    summary = busy_and_gaps([(0, 100), (50, 150), (350, 400), (450, 500)])
    assert summary == {"kernels": 4, "span_ms": 0.5, "busy_ms": 0.25, "idle_ms": 0.25, "busy_fraction": 0.5,
                       "gaps_over_100us": 1, "largest_gaps_ms": [0.2, 0.05]}
    assert busy_and_gaps([]) == {"kernels": 0}


def test_step_time_spread_is_median_p90_and_slowest():
    spread = step_time_spread([0.1] * 8 + [0.2, 1.0])
    assert (spread["step_time_p50_s"], spread["step_time_p90_s"], spread["step_time_max_s"]) == (0.1, 0.2, 1.0)
    assert len(spread["step_seconds"]) == 10 and step_time_spread([]) == {}


@pytest.mark.ray
@pytest.mark.parametrize("stage", [0, 2])
def test_raylaunch_reads_losses_back_once_a_step_not_once_a_micro_batch(stage, digits_data, tmp_path):
    """4 micro batches a step on each of 2 workers, clipping on (as the GPU bench trains): every call
    that would sync a GPU in a step, by where it was made. raylaunch's loop makes one a step (the
    settled losses; on a GPU a pinned copy read a step late), and DeepSpeed's own are listed."""
    data_dir, meta = digits_data
    run = RunConfig.model_validate({
        "model": {"type": "mlp", "width": 32, "depth": 1},
        "train": {"workers": 2, "epochs": 1, "micro_batch_size": 16, "grad_accum_steps": 4, "grad_clip": 1.0,
                  "zero": {"stage": stage}}})
    config = worker_config(ResolvedConfig.of(run), meta).replace(sync_audit=str(tmp_path / "audit"), profile_step=3)
    result = build_trainer(config, load_splits(data_dir), tmp_path / "ray", name=f"z{stage}").fit()
    for rank in (0, 1):
        counts = json.loads((tmp_path / "audit" / f"rank{rank}.json").read_text())
        steps, calls = counts["steps"], counts["calls"]
        assert steps == config.steps_per_epoch and counts["micro_batches"] == 4 * steps
        ours = {where: n for where, n in calls.items() if where.startswith(("trainers/", "dataprep/", "cluster/"))}
        assert ours == {"trainers/loop.py:settle Tensor.tolist": steps}, calls
        print(f"ZeRO-{stage} rank {rank}, per step:", {where: n / steps for where, n in sorted(calls.items())})
    metrics = result.metrics
    assert len(metrics["step_seconds"]) == config.steps_per_epoch
    assert metrics["step_time_p50_s"] <= metrics["step_time_p90_s"] <= metrics["step_time_max_s"]
    assert 0 < metrics["epoch_start_wait_s"] <= metrics["step_seconds"][0]  # the first step waited for it
    profile = metrics["profile"]
    assert profile["sorted_by"] == "self_cpu_time_total" and len(profile["top_ops"]) > 3
    assert profile["device"] == {"kernels": 0}  # no GPU here
