"""Training streams its data: a cached split larger than the object store memory Ray Data may use
for ingestion still trains, every rank taking the same number of full steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.ray


def test_training_streams_a_dataset_larger_than_its_ingest_budget(ray_cluster, tmp_path):
    from dataprep.cache import prepare
    from runconfig.schema import RunConfig
    from trainers.fit import build_trainer, load_splits, splits_in_memory
    from runconfig.resolved import ResolvedConfig
    from trainers.worker import worker_config

    rng = np.random.default_rng(0)
    rows, width = 60_000, 64
    x = rng.standard_normal((rows, width), dtype=np.float32)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(width)])
    frame["label"] = (x[:, :4].sum(1) > 0).astype(np.int64)  # a linear rule the model can learn
    for part in range(4):
        frame.iloc[part::4].to_parquet(tmp_path / f"part{part}.parquet", index=False)

    budget_mb = 4
    run = RunConfig.model_validate({
        "data": {"source": str(tmp_path / "*.parquet"), "transforms": ["standardize"], "ingest_memory_mb": budget_mb},
        "model": {"type": "mlp", "width": 16, "depth": 1},
        "train": {"workers": 2, "epochs": 2, "micro_batch_size": 500, "lr": 1e-2, "lr_schedule": "constant"},
    })
    meta, data_dir, _ = prepare(run.model_dump(mode="json")["data"], 128, tmp_path / "cache")
    train_bytes = sum(f.stat().st_size for f in (data_dir / "train").rglob("*.parquet"))
    assert meta["rows"]["train"] * width * 4 > 2 * budget_mb * 2**20 and train_bytes > budget_mb * 2**20

    config = worker_config(ResolvedConfig.of(run), meta)
    splits = load_splits(data_dir, run.data.in_memory, budget_mb)
    assert not splits_in_memory(splits)  # data.in_memory: auto keeps to the ingest budget
    result = build_trainer(config, splits, tmp_path / "ray", name="stream").fit()
    assert result.error is None
    assert result.metrics["step"] == 2 * (meta["rows"]["train"] // 2 // 500)
    assert result.metrics["val_rows"] == meta["rows"]["val"] // 2 * 2  # the equal split drops at most one row
    assert result.metrics["val_accuracy"] > 0.9


def test_image_folder_trains_a_cnn_with_augmentations_drawn_in_the_workers(ray_cluster, tmp_path):
    import sklearn.datasets
    from PIL import Image

    from dataprep.cache import prepare
    from runconfig.schema import RunConfig
    from trainers.fit import best_checkpoint, build_trainer, load_splits
    from runconfig.resolved import ResolvedConfig
    from trainers.worker import worker_config

    digits = sklearn.datasets.load_digits()
    for i in range(600):
        folder = tmp_path / "images" / f"digit_{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8), mode="L").resize((12, 12)).save(folder / f"{i}.png")
    run = RunConfig.model_validate({
        "data": {"source": str(tmp_path / "images"), "format": "images",
                 "transforms": [{"type": "standardize", "per": "channel"}, {"type": "random_crop", "size": [10, 10], "padding": 1},
                                {"type": "rotate", "degrees": 10}, {"type": "brightness", "max_delta": 0.2}]},
        "model": {"type": "cnn", "width": 16, "depth": 2},
        "train": {"workers": 2, "epochs": 6, "micro_batch_size": 32, "lr": 3e-3, "lr_schedule": "constant"},
    })
    meta, data_dir, _ = prepare(run.model_dump(mode="json")["data"], 128, tmp_path / "cache")
    assert meta["stored_shape"] == [1, 12, 12] and meta["input_shape"] == [1, 10, 10] and meta["num_classes"] == 10
    config = worker_config(ResolvedConfig.of(run), meta)
    result = build_trainer(config, load_splits(data_dir), tmp_path / "ray", name="images").fit()
    assert result.error is None
    _, metrics = best_checkpoint(result, "val_accuracy")
    assert metrics["val_accuracy"] > 0.5  # 10 classes: chance is 0.1 (0.67 after these 6 epochs)


def test_splits_held_in_memory_are_cut_into_equal_contiguous_shards_one_a_micro_batch_slot(ray_cluster, digits_data):
    """Held splits skip the streaming split: each micro-batch slot is its own shard, the rows in file order."""
    from trainers.fit import load_splits, slot_shards

    data_dir, meta = digits_data
    held = load_splits(data_dir, in_memory=True)
    keys = held["train"].to_pandas()["key"].tolist()  # every row's key, in file order
    shards = slot_shards(held, 3)
    assert sorted(shards) == ["train.0", "train.1", "train.2", "val.0", "val.1", "val.2"]
    per_slot = len(keys) // 3
    for slot in range(3):
        assert shards[f"train.{slot}"].to_pandas()["key"].tolist() == keys[slot * per_slot:(slot + 1) * per_slot]
    assert {shards[f"val.{slot}"].count() for slot in range(3)} == {meta["rows"]["val"] // 3}


def test_equal_slices_are_consecutive_equal_runs_across_table_boundaries():
    import pyarrow as pa

    from trainers.fit import equal_slices

    tables = [pa.table({"x": list(range(a, b))}) for a, b in ((0, 5), (5, 6), (6, 13))]

    def runs(parts):
        return [[x for t in run for x in t["x"].to_pylist()] for run in equal_slices(tables, parts)]

    assert runs(1) == [list(range(13))]
    assert runs(2) == [list(range(6)), list(range(6, 12))]  # row 12 dropped
    assert runs(4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert runs(13) == [[i] for i in range(13)]
    empty = equal_slices(tables, 14)  # fewer rows than ranks: each an empty slice with the columns
    assert [[t.num_rows for t in run] for run in empty] == [[0]] * 14 and empty[0][0].column_names == ["x"]
