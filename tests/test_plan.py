"""The preflight plan: model-state memory per ZeRO stage, `zero.stage: auto`, refusing what cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main
from trainers.memory import lowest_fitting_stage, plan_all_stages, plan_stage

LM = str(Path(__file__).parent.parent / "configs" / "lm.yaml")
P = 1_000_000


def test_fp32_adam_bytes_per_parameter_under_each_stage():
    # weights 4 + grads 4 + Adam moments 8 = 16 bytes per parameter; ZeRO shards them over 4 ranks step by step.
    device = [p.device_bytes for p in plan_all_stages(P, largest_layer=0, workers=4, precision="fp32")]
    assert device == [16 * P, 8 * P + 8 * P // 4, 4 * P + 12 * P // 4, 16 * P // 4]


def test_mixed_precision_stage_2_and_3_count_as_deepspeed_does():
    """The numbers written out (bytes per parameter, from DeepSpeed's estimators' own accounting), not
    the code's call of those estimators: a DeepSpeed that counts otherwise, or a plan that stops
    asking it, fails here. Per rank of 4: 16-bit weights (2 B) whole under ZeRO-2; 16-bit and 32-bit
    gradients, fp32 master weights and Adam's two moments (2 + 4 + 4 + 8 = 18 B) sharded."""
    two = plan_stage(2, P, 1000, 4, "bf16")
    assert (two.device_bytes, two.offloaded_bytes, two.source) == (2 * P + 18 * P // 4, 0, "deepspeed estimator")
    # ZeRO-3: all of it sharded, plus the largest layer gathered in fp32 (4 B a parameter).
    three = plan_stage(3, P, 1000, 4, "bf16")
    assert three.device_bytes == 4 * 1000 + 18 * P // 4
    # Everything offloaded: only the gathered layer stays; the node's CPU holds 18 B a parameter with a
    # 1.5x buffer, a quarter of it each rank's.
    offloaded = plan_stage(3, P, 1000, 4, "bf16", offload_optimizer=True, offload_param=True)
    assert (offloaded.device_bytes, offloaded.offloaded_bytes) == (4 * 1000, int(18 * P * 1.5) // 4)
    assert plan_stage(0, P, 0, 4, "bf16").device_bytes == 16 * P  # 2 + 2 + 12 (fp32 master, momentum, variance)


def test_offloading_moves_optimizer_and_parameters_off_the_device():
    plain, offloaded = plan_stage(3, P, 0, 2, "fp32"), plan_stage(3, P, 0, 2, "fp32", True, True)
    assert offloaded.device_bytes < plain.device_bytes and offloaded.offloaded_bytes == 12 * P // 2


def test_auto_picks_the_lowest_stage_that_fits():
    plans = plan_all_stages(P, 0, 4, "fp32")
    budget = plans[2].device_bytes / 0.8  # room for stage 2's model states, not stage 1's
    assert lowest_fitting_stage(plans, budget) == 2
    assert lowest_fitting_stage(plans, 1e15) == 0
    assert lowest_fitting_stage(plans, 1.0) is None


def test_plan_command_prints_the_table_and_the_auto_choice(ray_cluster, capsys):
    # 4.57 MiB of model states per worker at stage 2, 5.48 at stage 1 (lm.yaml's 478,720 parameters)
    code = main(["plan", LM, "--set", "train.zero.stage=auto", "--set", "cluster.worker_memory_gb=0.0065"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "478,720 parameters" in out and "ZeRO stage 2: picked by zero.stage: auto" in out


def test_plan_shows_an_elastic_range_and_the_accumulation_each_count_takes(ray_cluster, capsys):
    code = main(["plan", LM, "--set", "train.workers=[1, 2]", "--set", "train.zero.stage=2"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "workers 1-2 (as many as the cluster holds; resized as nodes go and come)" in out
    assert "x 4-2 accumulation x 1-2 workers = 64 per optimizer step" in out  # lm.yaml: 16 x 2 x 2


def test_plan_for_a_model_that_fits_no_stage_exits_2_with_the_numbers(ray_cluster, capsys):
    code = main(["plan", LM, "--set", "cluster.worker_memory_gb=0.001"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.zero.stage: stage 2 needs 4.57 MiB of model states per worker for 478,720 parameters" in err


def test_run_refuses_a_model_that_cannot_fit_before_any_worker_starts(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", LM, "--set", f"output.dir={run_dir}", "--set", "data.text_glob=json/*.py",
                 "--set", "train.zero.stage=auto", "--set", "cluster.worker_memory_gb=0.001"])
    err = capsys.readouterr().err
    assert code == 2 and "train.zero.stage: no ZeRO stage fits 478,720 parameters" in err
    assert not (run_dir / "ray").exists()  # no training was started


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_scale_plan_on_a_machine_without_gpus(ray_cluster, capsys, precision):
    code = main(["plan", LM, "--set", "train.use_gpu=true", "--set", f"train.precision={precision}",
                 "--set", "model.n_layer=24", "--set", "model.d_model=1024", "--set", "model.n_head=16",
                 "--set", "model.seq_len=1024", "--set", "train.workers=1", "--set", "cluster.gpu_memory_gb=16",
                 "--set", "train.zero.stage=auto"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "deepspeed estimator" in out and "picked by zero.stage: auto" in out
