"""`distill.teacher_outputs`: `precompute` (the teacher runs once over the train split as Ray Data
batch inference, its logits stored with the rows) and `live` (each worker runs the frozen
teacher) give the student the same targets, so the same training."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dataprep.stream import decode_tensors, parquet_files, stream_split
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig
from trainers.batches import model_batch
from trainers.distill import LOGITS, precompute_teacher_outputs
from trainers.fit import build_trainer, load_splits
from trainers.modeldir import model_spec, save_model_dir
from trainers.models import build_model
from trainers.worker import worker_config


def _rows(folder) -> dict[str, np.ndarray]:
    tables = [decode_tensors(pq.read_table(path)) for path in parquet_files(folder)]
    return {name: np.concatenate([t[name].to_numpy() for t in tables]) for name in tables[0].column_names}


@pytest.fixture(scope="module")
def teacher(digits_data, tmp_path_factory):
    """A teacher (an MLP with fixed random weights: what matters here is that both ways see the
    same logits) saved as the train stage saves one."""
    _, meta = digits_data
    model_cfg = {"type": "mlp", "width": 32, "depth": 1, "dropout": 0.0}
    torch.manual_seed(3)
    model = build_model(model_cfg, meta["input_shape"], meta["num_classes"])
    directory = tmp_path_factory.mktemp("teacher") / "teacher"
    save_model_dir(directory, model.state_dict(), model_spec(model_cfg, meta))
    return directory, model.eval()


@pytest.fixture(scope="module")
def outputs(digits_data, teacher, tmp_path_factory):
    data_dir, meta = digits_data
    target = tmp_path_factory.mktemp("precomputed") / "outputs"
    rows = precompute_teacher_outputs(str(teacher[0]), data_dir, target, meta, top_k=32, actors=2)
    return target, rows


def test_precomputed_outputs_are_the_teachers_logits_in_the_train_splits_order(digits_data, teacher, outputs):
    data_dir, meta = digits_data
    _, model = teacher
    target, rows = outputs
    assert rows == meta["rows"]["train"]
    stored, original = _rows(target / "train"), _rows(data_dir / "train")
    assert np.array_equal(stored["key"], original["key"])  # every row once, in the split's order
    features = np.stack(original["features"]).reshape(-1, *meta["stored_shape"])
    batch = {"features": torch.from_numpy(features), "label": torch.from_numpy(original["label"])}
    with torch.inference_mode():
        expected = model(model_batch(batch, meta)[0])
    assert torch.allclose(torch.from_numpy(np.stack(stored[LOGITS])), expected, atol=1e-5)
    assert not target.with_name("outputs.partial").exists()


def test_precomputed_and_live_teacher_outputs_train_the_same_student(ray_cluster, digits_data, teacher, outputs, tmp_path):
    data_dir, meta = digits_data
    directory, _ = teacher
    losses, weights = {}, {}
    for mode in ("live", "precompute"):
        run = ResolvedConfig.of(RunConfig.model_validate({
            "model": {"type": "mlp", "width": 32, "depth": 1},
            "train": {"workers": 1, "epochs": 1, "micro_batch_size": 64, "lr": 3e-3, "lr_schedule": "constant"},
            "distill": {"student": {"type": "mlp", "width": 8, "depth": 1}, "teacher_outputs": mode,
                        "temperature": 2.0, "alpha": 0.9},
        }))
        config = worker_config(run, meta, teacher_dir=str(directory))
        splits = load_splits(data_dir)
        if mode == "precompute":
            splits["train"] = stream_split(outputs[0], "train")
        result = build_trainer(config, splits, tmp_path / "ray", name=mode).fit()
        losses[mode] = (result.metrics["train_loss"], result.metrics["val_loss"])
        weights[mode] = load_file(f"{result.checkpoint.path}/model.safetensors")
    # The same batches against the same soft targets: the same losses and weights, up to the
    # float rounding of a teacher run in another batch size.
    assert losses["precompute"] == pytest.approx(losses["live"], rel=1e-4)
    for name, value in weights["live"].items():
        assert torch.allclose(weights["precompute"][name], value, atol=1e-4), name
