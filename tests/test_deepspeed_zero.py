"""Every ZeRO stage trains a tiny model over 2 gloo workers under Ray Train, and the loss goes down;
ZeRO-3's gathered weights are the ones plain data parallelism reaches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig
from trainers.fit import best_checkpoint, build_trainer, load_splits
from trainers.worker import worker_config


@pytest.fixture(scope="module")
def stage_runs(digits_data, tmp_path_factory):
    """One training run per ZeRO stage, the same model, seed and data, made when first asked for."""
    data_dir, meta = digits_data
    runs = {}

    def run(stage: int):
        if stage not in runs:
            config = RunConfig.model_validate({
                "model": {"type": "mlp", "width": 32, "depth": 1},
                "train": {"workers": 2, "epochs": 3, "micro_batch_size": 32, "lr": 3e-3, "zero": {"stage": stage},
                          "keep_checkpoints": 3},  # Result.metrics_dataframe has one row per kept checkpoint
            })
            runs[stage] = build_trainer(worker_config(ResolvedConfig.of(config), meta), load_splits(data_dir), tmp_path_factory.mktemp("zero"),
                                        name=f"zero{stage}").fit()
        return runs[stage]

    return run


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_on_two_gloo_workers(stage, stage_runs):
    result = stage_runs(stage)
    history = result.metrics_dataframe
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert history["val_accuracy"].iloc[-1] > 0.8  # 10 classes: chance is 0.1
    checkpoint, metrics = best_checkpoint(result, "val_accuracy")
    assert (Path(checkpoint) / "model.safetensors").stat().st_size > 4 * (64 * 32 + 32 * 10)  # the full, gathered weights
    assert metrics["val_accuracy"] == history["val_accuracy"].max()


def test_zero3_consolidated_weights_equal_zero0_weights(stage_runs):
    """ZeRO-3 shards every parameter across the ranks; gathered into one model.safetensors after
    training they are the weights plain data parallelism (stage 0) reaches from the same seed and data."""
    from safetensors.torch import load_file

    weights = {stage: load_file(str(Path(stage_runs(stage).checkpoint.path) / "model.safetensors")) for stage in (0, 3)}
    assert weights[0].keys() == weights[3].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[3][name], weights[0][name], rtol=1e-5, atol=1e-6)


def test_rows_not_divisible_by_the_world_size_do_not_hang(digits_data, tmp_path):
    """1,259 train rows over 3 ranks: the equal split drops the remainder, every rank takes the same
    number of optimizer steps, and ZeRO-3's per-step collectives all complete."""
    data_dir, meta = digits_data
    assert meta["rows"]["train"] % 3 != 0
    run = RunConfig.model_validate({
        "model": {"type": "mlp", "width": 32, "depth": 1},
        "train": {"workers": 3, "cpus_per_worker": 0.5, "epochs": 2, "micro_batch_size": 50, "grad_accum_steps": 2,
                  "lr": 3e-3, "zero": {"stage": 3}},
    })
    config = worker_config(ResolvedConfig.of(run), meta)
    result = build_trainer(config, load_splits(data_dir), tmp_path, name="ragged").fit()
    assert config.steps_per_epoch == meta["rows"]["train"] // 3 // 50 // 2
    assert result.metrics["step"] == 2 * config.steps_per_epoch


def test_deepspeed_is_imported_without_mlflow_or_its_shm_op_and_mlflow_still_imports_after(tmp_path):
    """A fresh process, as a worker is: DeepSpeed's autotuner finds no mlflow, none is loaded, and
    raylaunch's own `import mlflow` afterwards works. On CPU, DeepSpeed's comm backend is left
    without its shared-memory op: nothing is compiled into an empty extensions folder."""
    code = ("import sys; from trainers import import_deepspeed; ds = import_deepspeed(); "
            "assert 'mlflow' not in sys.modules and not ds.autotuning.autotuner.has_mlflow; "
            "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is None; "
            "import mlflow; print(mlflow.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "mlflow", done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(tmp_path.iterdir())
