"""Every ZeRO stage trains a tiny model over 2 gloo workers under Ray Train, and the loss goes down."""

from __future__ import annotations

import pytest

from launcher.config import RunConfig
from trainers.fit import best_checkpoint, build_trainer, load_splits
from trainers.loop import loop_config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_on_two_gloo_workers(stage, digits_data, tmp_path):
    data_dir, meta = digits_data
    run = RunConfig.model_validate({
        "model": {"type": "mlp", "width": 32, "depth": 1},
        "train": {"workers": 2, "epochs": 3, "micro_batch_size": 32, "lr": 3e-3, "zero": {"stage": stage},
                  "keep_checkpoints": 3},  # Result.metrics_dataframe has one row per kept checkpoint
    }).model_dump(mode="json")
    result = build_trainer(loop_config(run, meta), load_splits(data_dir), tmp_path, name=f"zero{stage}").fit()
    history = result.metrics_dataframe
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert history["val_accuracy"].iloc[-1] > 0.8  # 10 classes: chance is 0.1
    checkpoint, metrics = best_checkpoint(result, "val_accuracy")
    assert (checkpoint / "model.safetensors").stat().st_size > 4 * (64 * 32 + 32 * 10)  # the full, gathered weights
    assert metrics["val_accuracy"] == history["val_accuracy"].max()
