"""The preprocessed-data cache: one Parquet dataset per distinct (inputs, transforms) key.

The key hashes what the output depends on: each input file's path, size and modification time
(or the bundled dataset's name and scikit-learn's version), and the data section's settings
that change rows (label and feature columns, split fractions and seed, the non-augmenting
transforms, the text's sequence length). Augmentations are not in it: they are drawn at training
time from the cached rows. An entry is written beside its final place and renamed into it when
whole, so a failed or killed preprocess never leaves a half-written entry that a later run
would take for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import ray.data

from dataprep import AUGMENTATIONS, DataError, find_transform
from dataprep.sources import BadRows, Problems, data_files, sources_of
from dataprep.transforms import model_input_shape

VERSION = 2  # bump when the cached layout or the meaning of a setting changes
META = "meta.json"
SPLITS = ("train", "val", "test")
# Settings that decide how rows are read and made, not how fast.
_ROW_SETTINGS = ("source", "format", "text_glob", "label_column", "feature_columns", "key_column", "image_shape",
                 "val_fraction", "test_fraction", "seed", "on_bad_rows")


def input_identity(data: dict) -> list:
    """What identifies the inputs: [path, size, mtime] per file, or the bundled dataset's version."""
    sources = sources_of(data)
    if sources[0].startswith("sklearn:"):
        import sklearn

        return [[sources[0], sklearn.__version__]]
    files = data_files(data)
    infos = files.filesystem.get_file_info(files.paths)
    return [[i.path, i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File]


def cache_key(data: dict, seq_len: int | None) -> str:
    identity = {
        "version": VERSION,
        "settings": {k: data[k] for k in _ROW_SETTINGS},
        "transforms": [t for t in data["transforms"] if t["type"] not in AUGMENTATIONS],
        "seq_len": seq_len if data["format"] == "text" else None,
        "inputs": input_identity(data),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(data: dict, seq_len: int, cache_root: Path) -> tuple[dict, Path, bool]:
    """The preprocessed dataset for a data section: (meta, its folder, whether it was reused)."""
    key = cache_key(data, seq_len)
    entry = cache_root / key
    if (entry / META).is_file():
        return with_augmentations(json.loads((entry / META).read_text()), data), entry, True
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    ledger = BadRows.remote() if data["on_bad_rows"] == "skip" else None
    problems = Problems(ledger)
    context = ray.data.DataContext.get_current()
    # A DataError raised in a map task arrives as itself (inside RayTaskError), not as Ray Data's
    # "UDF failed to process a data block" that keeps only its text.
    raise_original = context.raise_original_map_exception
    context.raise_original_map_exception = True

    def writer(dataset: ray.data.Dataset) -> dict[str, int]:
        """Write a dataset with a `split` column (0 train, 1 val, 2 test) in one pass, as
        train/, val/ and test/ Parquet folders; returns their row counts."""
        import pyarrow.parquet as pq

        dataset.write_parquet(str(tmp / "parts"), partition_cols=["split"])
        rows = {}
        for number, name in enumerate(SPLITS):
            part = tmp / "parts" / f"split={number}"
            if part.is_dir():
                part.rename(tmp / name)
            rows[name] = sum(pq.read_metadata(f).num_rows for f in (tmp / name).rglob("*.parquet")) if part.parent.exists() and (tmp / name).is_dir() else 0
        shutil.rmtree(tmp / "parts", ignore_errors=True)
        return rows

    try:
        if data["format"] == "text":
            from dataprep.text import preprocess_text

            meta = preprocess_text(data, seq_len, writer, tmp)
        else:
            from dataprep.preprocess import preprocess

            meta = preprocess(data, writer, problems)
        meta["bad_rows"] = ray.get(ledger.report.remote()) if ledger else {}
        meta["cache_key"] = key
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another run finished the same entry meanwhile: theirs is as good
            shutil.rmtree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwrapped(exc) from None
    finally:
        context.raise_original_map_exception = raise_original
        if ledger is not None:
            ray.kill(ledger)
    return with_augmentations(json.loads((entry / META).read_text()), data), entry, False


def with_augmentations(meta: dict, data: dict) -> dict:
    """The cached metadata with this config's augmentations (not part of the cache key)."""
    augment = [t for t in data["transforms"] if t["type"] in AUGMENTATIONS]
    if meta["task"] == "lm":
        return meta
    crop = find_transform(augment, "random_crop")
    shape = meta["stored_shape"]
    if crop and (len(shape) != 3 or any(c > s + 2 * crop["padding"] for c, s in zip(crop["size"], shape[1:]))):
        raise DataError([f"data.transforms: random_crop size {list(crop['size'])} with padding {crop['padding']} "
                         f"does not fit images of {shape[1:]} (height, width)"])
    if augment and len(shape) != 3:
        raise DataError([f"data.transforms: {augment[0]['type']} needs images ([channels, height, width]); these rows have shape {shape}"])
    return {**meta, "augment": augment, "input_shape": model_input_shape(shape, augment)}


def _unwrapped(exc: BaseException) -> BaseException:
    """A DataError raised inside a Ray task arrives wrapped (RayTaskError, UserCodeException);
    the user needs the DataError's own line, not the remote traceback."""
    seen = exc
    while seen is not None:
        if isinstance(seen, DataError) and type(seen) is DataError:
            return seen
        if isinstance(seen, DataError):  # RayTaskError(DataError): the original is its cause
            return DataError(list(getattr(seen, "cause", seen).problems))
        seen = getattr(seen, "cause", None) or seen.__cause__
    return exc
