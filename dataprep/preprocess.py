"""The preprocess stage for tables and images: read, check, encode, split, fit, write; all as Ray
Data operations (`map_batches` tasks across the cluster, the fitted statistics reduced from
per-task partial sums), never a loop over rows on the driver.

Output (one cache entry, see `dataprep.cache`): `train/`, `val/` and `test/` Parquet folders with
`features` (float32 [F] for tables, uint8 pixels [C, H, W] for images, as read), `label` (int64
class index) and `key` (int64, the row's identity hash: it seeds the row's split and its
augmentations), and `meta.json` describing them (classes, input shape, row counts, and the
normalization fitted on the train split, which `trainers.batches.model_batch` applies as batches
reach the model). Images take one pass: their classes are their folders' names, and the
statistics are taken by the tasks that write. Tables take two, since their classes are values
found in the rows.
"""

from __future__ import annotations

import math
import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data

from dataprep import ORDER, DataError, find_transform, label_classes
from dataprep.sources import (BUNDLED_IMAGE_SHAPES, FILE, ROW, Files, Problems, format_of, image_mode, read_bundled,
                              read_images, read_tables, sources_of, table_features)
from dataprep.transforms import shift_and_scale

def preprocess(data: dict, files: Files | None, writer, problems: Problems) -> dict:
    """Read and encode a table or image source (`files`, as `data_files` lists them; None for a
    bundled dataset); `writer(dataset, fit)` stores the splits (a `split`
    column: 0 train, 1 val, 2 test) and returns their row counts and, given `fit` (column, per),
    the train rows' `FeatureStats`. Returns the metadata."""
    transforms = data["transforms"]
    resize = find_transform(transforms, "resize")
    sources = sources_of(data)
    label = data["label_column"]
    keyed = {"seed": data["seed"], "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"],
             "problems": problems}
    map_args = {"batch_size": data["batch_size"], "concurrency": data["concurrency"]}
    keyed["classes"] = label_classes(transforms)

    scaler = find_transform(transforms, "standardize", "minmax")
    per = scaler["per"] if scaler else "feature"

    if len(sources) == 1 and sources[0].startswith("sklearn:"):
        name = sources[0].removeprefix("sklearn:")
        ds = read_bundled(name, label)
        features = [c for c in ds.schema().names if c not in (label, FILE, ROW, data["key_column"])]
        shape = data["image_shape"] or BUNDLED_IMAGE_SHAPES.get(name) or [len(features)]
        fmt = "bundled"
    else:
        found = files
        fmt = format_of(found) if data["format"] == "auto" else data["format"]
        if fmt == "images":
            _check_class_folders(found)
            mode, shape = image_mode(found)
            if resize:
                shape = [shape[0], *resize["size"]]
            _check_per(scaler, per, shape)
            # The class folders, known from the paths: no pass over the data.
            classes = keyed["classes"] or class_folders(found)
            _check_classes(classes, label, sources)
            ds = read_images(found, mode, shape, resize["size"] if resize else None, problems, data["seed"])
            # One pass: decode, check, key, split and write, fitting the statistics as it writes. Each
            # decoding task's block is encoded whole (a row count here would merge small tasks).
            encoded = ds.map_batches(_encode_images, fn_kwargs={"shape": shape, "relative": found.relative,
                                                                "index": {c: i for i, c in enumerate(classes)}, **keyed},
                                     batch_format="numpy", batch_size=None, compute=ray.data.TaskPoolStrategy(size=data["concurrency"]))
            features = None
        else:
            features = table_features(found, fmt, data)
            shape = data["image_shape"] or [len(features)]
            ds = read_tables(found, fmt, problems, data["batch_size"])
    if features is not None:
        if math.prod(shape) != len(features):
            raise DataError([f"data.image_shape: {shape} holds {math.prod(shape)} values but there are {len(features)} feature columns"])
        _check_per(scaler, per, shape)
        encoded = ds.map_batches(_encode_table, fn_kwargs={"features": features, "label": label, "key": data["key_column"],
                                                           "all_columns": data["feature_columns"] is None,
                                                           "shape": shape, **keyed},
                                 # one read block (data.batch_size rows of one file) per call
                                 batch_format="pyarrow", batch_size=None, compute=ray.data.TaskPoolStrategy(size=data["concurrency"])).materialize()
        if encoded.count() == 0:
            _no_rows(sources, problems)
        # Labels are values in the rows: one pass over the encoded rows finds them, then a second
        # turns them into class indices as it writes.
        classes = keyed["classes"] or sorted(encoded.unique("label"), key=_label_order)
        _check_classes(classes, label, sources)
        encoded = encoded.map_batches(_label_index, fn_kwargs={"index": {c: i for i, c in enumerate(classes)}},
                                      batch_format="numpy", **map_args)

    rows, stats = writer(encoded, ("features", per) if scaler else None)
    total = sum(rows.values())
    if total == 0:
        _no_rows(sources, problems)
    if rows["train"] == 0:
        raise DataError([f"data.val_fraction: the train split is empty ({total} rows in all); use more data or smaller fractions"])
    for name, count in rows.items():
        if count == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({total} rows in all); use more data or a larger fraction"])
    if stats is not None and fmt == "images":
        stats = pixel_stats(stats)
    shift, scale = shift_and_scale(stats, scaler["type"] if scaler else None, per, shape)
    return {
        "format": fmt,
        "files": len(files.paths) if files is not None else 1,
        "task": "classify",
        "feature_columns": features,
        "label_column": label,
        "classes": [_plain(c) for c in classes],
        "num_classes": len(classes),
        "num_features": math.prod(shape),
        "stored_shape": list(shape),
        "input_shape": list(shape),
        # The cache holds features as read (images as uint8 pixels): `trainers.batches.model_batch`
        # scales pixels to [0, 1], augments, then applies this.
        "normalize": {"method": scaler["type"] if scaler else "none", "per": per,
                      "shift": shift.tolist(), "scale": scale.tolist(), "train_rows": rows["train"]},
        "seed": data["seed"],
        "rows": rows,
    }


def _check_per(scaler: dict | None, per: str, shape: list[int]) -> None:
    if per == "channel" and len(shape) != 3:
        raise DataError([f"data.transforms: {scaler['type']} per channel needs images ([channels, height, width]); these rows have shape {shape}"])


def _check_classes(classes: list, label: str, sources: list[str]) -> None:
    if len(classes) < 2:
        raise DataError([f"data.label_column: {label!r} has {len(classes)} distinct value(s) in {', '.join(sources)}; classification needs at least 2"])


def _no_rows(sources: list[str], problems: Problems):
    raise DataError([f"data.source: {', '.join(sources)} holds no rows" + (" that could be read (every row was bad)" if problems.ledger else "")])


def _folder(relative_path: str) -> str:
    """An image's class: the folder it is in, relative to the source root."""
    return relative_path.rpartition("/")[0]


def class_folders(files: Files) -> list[str]:
    """The classes of an image-folder source: its files' folders, in label order."""
    return sorted({_folder(files.relative(p)) for p in files.paths}, key=_label_order)


def pixel_stats(stats: list) -> list:
    """Statistics fitted on raw uint8 pixels, for the [0, 1] pixels the model sees."""
    return [stats[0], stats[1] / 255, stats[2] / 255**2, stats[3] / 255, stats[4] / 255]


def _check_class_folders(found) -> None:
    loose = [p for p in found.paths if "/" not in found.relative(p)]
    if loose:
        raise DataError([f"data.source: {loose[0]} is not in a class folder; data.format images wants one subfolder per class "
                         f"(source/cat/1.png, source/dog/2.png), the folder name being the label"])


def _label_order(label: str):
    """Labels sort as numbers when they all are (2 before 10), else as text."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def _plain(label: str):
    try:
        return int(label)
    except ValueError:
        return label


def row_keys(values) -> np.ndarray:
    """A 64-bit identity hash per row (pandas' SipHash with its fixed key: the same on every machine)."""
    if isinstance(values, pd.DataFrame):
        return pd.util.hash_pandas_object(values, index=False).to_numpy()
    return pd.util.hash_array(np.asarray(values, dtype=object))


def split_of(keys: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test for each row key: a keyed hash of the key and the seed, so a row's
    split depends on nothing else (adding files keeps old rows where they were)."""
    from dataprep.transforms import uniform

    unit = uniform(keys, seed, epoch=-1, draw=0)
    return np.where(unit < test_fraction, 2, np.where(unit < test_fraction + val_fraction, 1, 0)).astype(np.int8)


def _numeric(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """float64 values and a mask of the rows whose value is not a finite number."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    else:
        values = pd.to_numeric(pd.Series(column.cast(pa.string()).to_pylist(), dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    return values, ~np.isfinite(values)


def _encode_table(batch: pa.Table, features: list[str], label: str, key: str | None, all_columns: bool, shape: list[int],
                  seed: int, val_fraction: float, test_fraction: float, classes: list[str] | None, problems: Problems) -> dict:
    file = batch[FILE][0].as_py() if batch.num_rows else ""
    present = [c for c in batch.column_names if c not in (FILE, ROW)]
    missing = [c for c in [*features, label, *([key] if key else [])] if c not in present]
    extra = [c for c in present if c not in (*features, label, key)] if all_columns else []
    if missing or extra:
        differ = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                             f"extra {', '.join(extra)}" if extra else "") if part)
        raise DataError([f"{file}: its columns differ from the first file's ({differ}); make the files' schemas agree "
                         f"or list data.feature_columns"])
    columns, bad = [], np.zeros(batch.num_rows, dtype=bool)
    entries = []
    for name in features:
        values, wrong = _numeric(batch[name])
        if wrong.any():
            raw = batch[name].to_pylist()
            rows = batch[ROW].to_numpy()
            entries += [(file, int(rows[i]), f"column {name!r}: {raw[i]!r} is not a number") for i in np.flatnonzero(wrong & ~bad)]
        columns.append(values)
        bad |= wrong
    labels = batch[label].cast(pa.string())
    no_label = np.asarray(labels.is_null())
    if no_label.any():
        rows = batch[ROW].to_numpy()
        entries += [(file, int(rows[i]), f"no value in the label column {label!r}") for i in np.flatnonzero(no_label & ~bad)]
        bad |= no_label
    if classes is not None:
        unknown = ~np.isin(np.asarray(labels.fill_null("").to_pylist(), dtype=object), classes) & ~bad
        rows, values = batch[ROW].to_numpy(), labels.to_pylist()
        entries += [(file, int(rows[i]), f"label {values[i]!r} is not among the label_encode classes {classes}")
                    for i in np.flatnonzero(unknown)]
        bad |= unknown
    problems(entries)
    keep = ~bad
    x = np.stack(columns, axis=1)[keep].astype(np.float32).reshape(-1, *shape)
    y = np.asarray(labels.to_pylist(), dtype=object)[keep]
    frame = pd.DataFrame(x.reshape(len(x), -1))
    frame["label"] = y
    content = row_keys(frame)
    keys = row_keys(batch[key].cast(pa.string()).to_pylist())[keep] if key else content
    # A key column may give two rows the same key: their content orders them in the cache.
    order = {ORDER: content.view(np.int64)} if key else {}
    return {"features": x, "label": y.astype(str), "key": keys.view(np.int64), **order,
            "split": split_of(keys, seed, val_fraction, test_fraction),
            FILE: batch[FILE].to_numpy(zero_copy_only=False)[keep], ROW: batch[ROW].to_numpy()[keep]}


def _encode_images(batch: dict, shape: list[int], relative, index: dict, seed: int, val_fraction: float, test_fraction: float,
                   classes: list[str] | None, problems: Problems) -> dict:
    images = batch["image"]
    files = [str(f) for f in batch[FILE]]
    labels = np.array([_folder(relative(f)) for f in files], dtype=object)
    keep = np.array([tuple(image.shape) == tuple(shape) for image in images], dtype=bool)
    unknown = np.array([label not in index for label in labels], dtype=bool) & keep
    problems([(f, 0, f"its folder {label!r} is not among the label_encode classes {classes}")
              for f, label, u in zip(files, labels, unknown) if u])
    keep &= ~unknown
    wrong = [(f, 0, f"the image is {image.shape[2]}x{image.shape[1]} ({image.shape[0]} channel(s)) where the first was "
                    f"{shape[2]}x{shape[1]} ({shape[0]}); add a resize transform to data.transforms")
             for f, image, k, u in zip(files, images, keep, unknown) if not k and not u]
    problems(wrong)
    # Pixels stay uint8 in the cache (a quarter of float32's bytes to write and stream).
    x = np.stack([image for image, k in zip(images, keep) if k]) if keep.any() else np.zeros((0, *shape), np.uint8)
    keys = row_keys([relative(f) for f, k in zip(files, keep) if k])
    return {"features": x, "label": np.array([index[label] for label in labels[keep]], dtype=np.int64),
            "key": keys.view(np.int64), "split": split_of(keys, seed, val_fraction, test_fraction)}


def _label_index(batch: dict, index: dict) -> dict:
    return {"features": batch["features"], "label": np.array([index[str(v)] for v in batch["label"]], dtype=np.int64),
            "key": batch["key"], "split": batch["split"], **({ORDER: batch[ORDER]} if ORDER in batch else {})}
