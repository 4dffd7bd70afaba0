"""The preprocess stage: encode, split, normalize and write the dataset, all as Ray Data operations.

Output under the data directory: `train/`, `val/` and `test/` Parquet folders with a `features`
tensor column (float32) and a `label` column (int64 class index), and `meta.json` describing
them (classes, input shape, fitted normalization, row counts).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from dataprep import DataError
from dataprep.sources import read_source

SPLITS = ("train", "val", "test")


def preprocess(data: dict, out_dir: Path) -> dict:
    """Run the whole preprocess stage for a `data` config section; returns the metadata it wrote.
    The directory appears complete or not at all (written beside it, then renamed)."""
    ds, bundled_shape = read_source(data["source"], data["format"], data["label_column"])
    label = data["label_column"]
    features = _feature_columns(ds, data)
    image_shape = data["image_shape"] or bundled_shape
    if image_shape is not None and math.prod(image_shape) != len(features):
        raise DataError(
            [f"data.image_shape: {image_shape} holds {math.prod(image_shape)} values but there are {len(features)} feature columns"]
        )
    classes = sorted(ds.unique(label))
    if len(classes) < 2:
        raise DataError([f"data.label_column: {label!r} has {len(classes)} distinct value(s) in {data['source']}; classification needs at least 2"])

    encoded = ds.map_batches(
        _encode,
        fn_kwargs={"features": features, "label": label, "classes": classes, "seed": data["seed"],
                   "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"]},
        batch_format="pyarrow",
    ).materialize()
    splits = {name: encoded.map_batches(_select, fn_kwargs={"split": i}, batch_format="numpy") for i, name in enumerate(SPLITS)}
    shift, scale, stats = _fit_normalization(splits["train"], data["normalize"])

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = {}
    for name, split in splits.items():
        scaled = split.map_batches(_scale, fn_kwargs={"shift": shift, "scale": scale}, batch_format="numpy").materialize()
        rows[name] = scaled.count()
        if rows[name] == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({encoded.count()} rows in all); use more data or a larger fraction"])
        scaled.write_parquet(str(tmp / name))
    meta = {
        "source": data["source"],
        "feature_columns": features,
        "label_column": label,
        "classes": [c.item() if isinstance(c, np.generic) else c for c in classes],
        "num_classes": len(classes),
        "num_features": len(features),
        "input_shape": list(image_shape) if image_shape else [len(features)],
        "normalize": {"method": data["normalize"], "shift": shift.tolist(), "scale": scale.tolist(), **stats},
        "rows": rows,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out_dir)
    return meta


def _feature_columns(ds: ray.data.Dataset, data: dict) -> list[str]:
    schema = ds.schema()
    columns = list(schema.names)
    label = data["label_column"]
    if label not in columns:
        raise DataError([f"data.label_column: {label!r} is not a column of {data['source']} (columns: {', '.join(columns)})"])
    features = data["feature_columns"] or [c for c in columns if c != label]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError([f"data.feature_columns: {', '.join(missing)} not in {data['source']} (columns: {', '.join(columns)})"])
    types = dict(zip(schema.names, schema.types))
    not_numeric = [c for c in features if not _is_numeric(types[c])]
    if not_numeric:
        raise DataError([f"data.feature_columns: {', '.join(not_numeric)} in {data['source']} not numeric; list only numeric columns in data.feature_columns"])
    if not features:
        raise DataError([f"data.feature_columns: {data['source']} has no feature columns besides the label"])
    return features


def _is_numeric(arrow_type) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)


def split_of(rows: np.ndarray, labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test for each row, from a keyed hash of the row's content: deterministic
    for a seed, independent of row order and of the other rows (adding files keeps old rows put)."""
    key = seed.to_bytes(8, "little", signed=True)
    content = np.concatenate([np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8),
                              np.ascontiguousarray(labels, dtype=np.int64)[:, None].view(np.uint8)], axis=1)
    unit = np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), key=key, digest_size=8).digest(), "little") / 2**64
                     for r in content])
    return np.where(unit < test_fraction, 2, np.where(unit < test_fraction + val_fraction, 1, 0)).astype(np.int8)


def _encode(batch: pa.Table, features: list[str], label: str, classes: list, seed: int,
            val_fraction: float, test_fraction: float) -> dict:
    x = np.stack([batch[c].to_numpy(zero_copy_only=False).astype(np.float32) for c in features], axis=1)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in batch[label].to_pylist()], dtype=np.int64)
    return {"features": x, "label": y, "split": split_of(x, y, seed, val_fraction, test_fraction)}


def _select(batch: dict, split: int) -> dict:
    keep = batch["split"] == split
    return {"features": batch["features"][keep], "label": batch["label"][keep]}


def _partial_stats(batch: dict) -> dict:
    x = batch["features"].astype(np.float64)
    return {"count": np.array([len(x)]), "sum": x.sum(0)[None], "sumsq": (x * x).sum(0)[None],
            "min": x.min(0, initial=np.inf)[None], "max": x.max(0, initial=-np.inf)[None]}


def _fit_normalization(train: ray.data.Dataset, method: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-feature shift and scale fitted on the train split; the reduction runs as Ray tasks,
    the driver only adds up one small row per block."""
    parts = train.map_batches(_partial_stats, batch_format="numpy").take_all()
    count = sum(int(p["count"]) for p in parts)
    total = sum(p["sum"] for p in parts)
    mean = total / count
    std = np.sqrt(np.maximum(sum(p["sumsq"] for p in parts) / count - mean**2, 0.0))
    low, high = np.min([p["min"] for p in parts], 0), np.max([p["max"] for p in parts], 0)
    if method == "standard":
        shift, scale = mean, np.where(std > 1e-8, std, 1.0)  # a constant feature stays 0, not NaN
    elif method == "minmax":
        shift, scale = low, np.where(high - low > 1e-8, high - low, 1.0)
    else:
        shift, scale = np.zeros_like(mean), np.ones_like(mean)
    return shift.astype(np.float32), scale.astype(np.float32), {"train_rows": count}


def _scale(batch: dict, shift: np.ndarray, scale: np.ndarray) -> dict:
    return {"features": ((batch["features"] - shift) / scale).astype(np.float32), "label": batch["label"]}
