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
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import ray.data

from dataprep import AUGMENTATIONS, ORDER, DataError, find_transform
from dataprep.sources import BadRows, Files, Problems, data_files, format_of, sources_of
from dataprep.stream import encode_tensors
from dataprep.transforms import FeatureStats, model_input_shape

VERSION = 5  # bump when the cached layout or the meaning of a setting changes
META = "meta.json"
SPLITS = ("train", "val", "test")
# Settings that decide how rows are read and made, not how fast.
_ROW_SETTINGS = ("source", "format", "text_glob", "label_column", "feature_columns", "key_column", "image_shape",
                 "val_fraction", "test_fraction", "seed", "on_bad_rows")


def input_identity(data: dict, files: Files | None) -> list:
    """What identifies the inputs: [path, size, mtime] per file, or the bundled dataset's version."""
    if files is None:
        import sklearn

        return [[sources_of(data)[0], sklearn.__version__]]
    infos = files.filesystem.get_file_info(files.paths)
    return [[i.path, i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File]


def cache_key(data: dict, seq_len: int | None, files: Files | None) -> str:
    identity = {
        "version": VERSION,
        "settings": {k: data[k] for k in _ROW_SETTINGS},
        "transforms": [t for t in data["transforms"] if t["type"] not in AUGMENTATIONS],
        "seq_len": seq_len if data["format"] == "text" else None,
        "inputs": input_identity(data, files),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(data: dict, seq_len: int, cache_root: Path,
            progress: Callable[[int, int | None], None] | None = None) -> tuple[dict, Path, bool]:
    """The preprocessed dataset for a data section: (meta, its folder, whether it was reused).
    `progress(rows written, rows expected or None)` is called about twice a second while it writes."""
    # Listed once: the key and the preprocessing see the same files.
    files = None if sources_of(data)[0].startswith("sklearn:") else data_files(data)
    key = cache_key(data, seq_len, files)
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
    # Preprocessing has the cluster to itself, and its work is one chain of fused map tasks. Ray
    # Data's per-operator reservations only held it back: on 2 CPUs it ran one task at a time
    # for the first 1.5 s (20k images: 4.3 s with them, 3.3 s without).
    reservation = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False

    def writer(dataset: ray.data.Dataset, fit: tuple[str, str] | None = None) -> tuple[dict[str, int], list | None]:
        """Write a dataset with a `split` column (0 train, 1 val, 2 test) as train/, val/ and test/
        Parquet folders (`write_splits`); returns their row counts and, given `fit` (column, per),
        the train rows' `FeatureStats`, taken by the same tasks that write them."""
        with _watch(tmp, progress, expected_rows(data, files) if progress else None):
            return write_splits(dataset, tmp, fit)

    try:
        if data["format"] == "text":
            from dataprep.text import preprocess_text

            meta = preprocess_text(data, files, seq_len, writer, tmp)
        else:
            from dataprep.preprocess import preprocess

            meta = preprocess(data, files, writer, problems)
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
        context.op_resource_reservation_enabled = reservation
        if ledger is not None:
            ray.kill(ledger)
    return with_augmentations(json.loads((entry / META).read_text()), data), entry, False


def expected_rows(data: dict, files: Files | None) -> int | None:
    """The rows preprocessing will write, where that is cheap to know before it starts: one per
    image file, or the row counts in Parquet files' footers. None for the rest (CSV, JSONL, text)."""
    if files is None or not files.paths:
        return None
    fmt = data["format"] if data["format"] != "auto" else format_of(files)
    if fmt == "images":
        return len(files.paths)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        total = 0
        for path in files.paths:
            with files.filesystem.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total
    return None


@contextmanager
def _watch(folder: Path, progress: Callable[[int, int | None], None] | None, expected: int | None,
           every: float = 0.5) -> Iterator[None]:
    """While the block writes Parquet files under `folder`, call `progress` with the rows in the
    files written so far (read from each finished file's footer) every `every` seconds."""
    if progress is None:
        yield
        return
    import pyarrow.parquet as pq

    counted: dict[Path, int] = {}
    stop = threading.Event()

    def count() -> None:
        for path in folder.rglob("*.parquet"):
            if path not in counted:
                try:
                    counted[path] = pq.read_metadata(path).num_rows
                except (OSError, ValueError):  # still being written: its footer comes last
                    continue
        progress(sum(counted.values()), expected)

    def poll() -> None:
        while not stop.wait(every):
            count()

    thread = threading.Thread(target=poll, name="preprocess-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    count()


# A split is cut into files of about FILE_BYTES, and into at least MIN_FILES where it has the rows:
# enough files for the read tasks that stream it to run side by side.
FILE_BYTES, MIN_FILES = 32 << 20, 8


def write_splits(dataset: ray.data.Dataset, root: Path, fit: tuple[str, str] | None) -> tuple[dict[str, int], list | None]:
    """Write each split as Parquet files whose rows and order depend on the inputs and settings
    alone, not on how Ray Data happened to spread the work: the rows are sorted by split, key (and
    ORDER), then cut into files at fixed positions, part-000000.parquet first. A cache rebuilt on
    another machine or cluster then holds the same rows in the same files, which is what lets a
    resume or a second run of the same config train the same model from step 1. Returns the
    splits' row counts and, given `fit` (column, per), the train rows' `FeatureStats`, combined in
    file order (floating-point sums depend on their order)."""
    keys = ["split", "key", *([ORDER] if ORDER in dataset.schema().names else [])]
    tables = dataset.sort(keys).materialize().to_arrow_refs()
    summaries = ray.get([_block_summary.remote(table) for table in tables])
    blocks = [(table, summary["rows"]) for table, summary in zip(tables, summaries) if summary["rows"]]
    counts = [sum(s["splits"][i] for s in summaries) for i in range(len(SPLITS))]
    total = max(sum(counts), 1)
    row_bytes = max(1, sum(s["bytes"] for s in summaries) // total)
    writes, start = [], 0
    for number, name in enumerate(SPLITS):
        rows = counts[number]
        per_file = max(1, min(-(-rows // MIN_FILES), FILE_BYTES // row_bytes))
        for index, first in enumerate(range(start, start + rows, per_file)):
            last = min(first + per_file, start + rows)
            pieces = _pieces(blocks, first, last)
            writes.append(_write_part.remote(str(root / name / f"part-{index:06d}.parquet"),
                                             fit if number == 0 else None, [p[1:] for p in pieces], *[p[0] for p in pieces]))
        start += rows
    stats = None
    combine = FeatureStats(*fit).combine if fit else None
    for returned in ray.get(writes):
        if combine and returned is not None:
            stats = combine(stats, returned)
    return dict(zip(SPLITS, counts)), stats


def _pieces(blocks: list[tuple], first: int, last: int) -> list[tuple]:
    """The (table, start, stop) slices of the sorted blocks that hold global rows [first, last)."""
    pieces, offset = [], 0
    for table, rows in blocks:
        lo, hi = max(first, offset), min(last, offset + rows)
        if lo < hi:
            pieces.append((table, lo - offset, hi - offset))
        offset += rows
    return pieces


@ray.remote(num_cpus=1)
def _block_summary(table) -> dict:
    """A sorted block's rows per split, and the bytes its stored columns take."""
    split = table["split"].to_numpy()
    kept = table.drop_columns([c for c in ("split", ORDER) if c in table.column_names])
    return {"rows": table.num_rows, "splits": [int((split == i).sum()) for i in range(len(SPLITS))],
            "bytes": int(kept.nbytes)}


@ray.remote(num_cpus=1)
def _write_part(path: str, fit: tuple[str, str] | None, slices: list[tuple[int, int]], *tables) -> list | None:
    """One cached file: the slices of sorted blocks it holds, without the ordering columns, tensors
    as `dataprep.stream.encode_tensors` stores them; given `fit`, its rows' `FeatureStats`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = pa.concat_tables([table.slice(start, stop - start) for table, (start, stop) in zip(tables, slices)])
    part = part.drop_columns([c for c in ("split", ORDER) if c in part.column_names])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(encode_tensors(part), path)
    return FeatureStats(*fit).aggregate_block(part) if fit else None


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
