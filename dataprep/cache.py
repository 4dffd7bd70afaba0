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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.data

from cluster.raycompat import preprocessing_context
from dataprep import ORDER, DataError, find_transform
from dataprep.meta import DataMeta
from dataprep.sources import BadRows, Files, Problems, data_files, format_of, sources_of
from dataprep.stream import encode_tensors
from dataprep.text import HfTokenizer
from dataprep.text_tables import text_task
from dataprep.transforms import FeatureStats, model_input_shape
from runconfig.schema import AUGMENTATIONS

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


def cache_key(data: dict, seq_len: int | None, files: Files | None, hf: HfTokenizer | None = None,
              task: str = "lm", packed: bool = False) -> str:
    text = data["format"] == "text" or data["text_column"] is not None or data["instructions"] is not None
    identity = {
        "version": VERSION,
        "settings": {k: data[k] for k in _ROW_SETTINGS},
        "transforms": [t for t in data["transforms"] if t["type"] not in AUGMENTATIONS],
        "seq_len": seq_len if text else None,
        "inputs": input_identity(data, files),
    }
    if data["text_column"] is not None:  # a table's text: packed for a language model, or a classifier's rows
        identity |= {"text_column": data["text_column"], "task": task}
    if hf is not None and text:
        identity["tokenizer"] = hf.fingerprint()
    if data["instructions"] is not None:  # rendered with a chat template, maybe several examples a row
        identity |= {"instructions": data["instructions"], "packed": packed,
                     "chat_template": hf.load().chat_template if hf is not None and hf.source else None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(data: dict, seq_len: int, cache_root: Path,
            progress: Callable[[int, int | None], None] | None = None,
            hf: HfTokenizer | None = None, model_task: str = "auto", packed: bool = False) -> tuple[DataMeta, Path, bool]:
    """The preprocessed dataset for a data section: (meta, its folder, whether it was reused).
    `progress(rows written, rows expected or None)` is called about twice a second while it writes.
    `hf`: text for a transformers model, tokenized with its tokenizer (`dataprep.text`);
    `model_task`: what a table's text column is for (`dataprep.text_tables.text_task`); `packed`:
    several instruction examples a row (data.pack, where the model's attention separates them)."""
    # Listed once: the key and the preprocessing see the same files.
    files = None if sources_of(data)[0].startswith("sklearn:") else data_files(data)
    task = text_task(data, model_task, files)
    key = cache_key(data, seq_len, files, hf, task, packed)
    entry = cache_root / key
    if (entry / META).is_file():
        return with_augmentations(json.loads((entry / META).read_text()), data), entry, True
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    ledger = BadRows.remote() if data["on_bad_rows"] == "skip" else None
    problems = Problems(ledger)

    def writer(dataset: ray.data.Dataset, fit: tuple[str, str] | None = None) -> tuple[dict[str, int], list | None]:
        """Write a dataset with a `split` column (0 train, 1 val, 2 test) as train/, val/ and test/
        Parquet folders (`write_splits`); returns their row counts and, given `fit` (column, per),
        the train rows' `FeatureStats`, taken by the same tasks that write them."""
        return write_splits(dataset, tmp, fit, lambda parts: _watch(parts, progress, expected_rows(data, files)
                                                                    if progress else None))

    try:
        with preprocessing_context():  # errors as themselves, no per-operator reservations (cluster.raycompat, 6)
            meta = _preprocess(data, files, seq_len, writer, tmp, problems, hf, task, packed)
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
        if ledger is not None:
            ray.kill(ledger)
    return with_augmentations(json.loads((entry / META).read_text()), data), entry, False


def _preprocess(data: dict, files: Files | None, seq_len: int, writer, tmp: Path, problems: Problems,
                hf: HfTokenizer | None = None, task: str = "lm", packed: bool = False) -> DataMeta:
    if data["instructions"] is not None:
        from dataprep.instructions import preprocess_instructions

        return preprocess_instructions(data, files, seq_len, writer, tmp, problems, hf, packed)
    if data["text_column"] is not None:
        from dataprep.text_tables import preprocess_text_table

        return preprocess_text_table(data, files, task, seq_len, writer, tmp, problems, hf)
    if data["format"] == "text":
        from dataprep.text import preprocess_text

        return preprocess_text(data, files, seq_len, writer, tmp, hf)
    from dataprep.preprocess import preprocess

    return preprocess(data, files, writer, problems)


def expected_rows(data: dict, files: Files | None) -> int | None:
    """The rows preprocessing will write, where that is cheap to know before it starts: one per
    image file, or the row counts in Parquet files' footers. None for the rest (CSV, JSONL, text)."""
    if files is None or not files.paths or data["text_column"] is not None or data["instructions"] is not None:
        # text rows become blocks, instruction rows maybe several to one
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


# A split's files: about FILE_BYTES each, and at least MIN_FILES where the split has MIN_FILES x
# MIN_FILE_ROWS rows (enough files for the read tasks that stream it to run side by side).
FILE_BYTES, MIN_FILES, MIN_FILE_ROWS = 32 << 20, 8, 256
PARTS = ".parts"
KEYS = 1 << 64  # row keys are 64-bit hashes (stored as int64): uniform over [-2**63, 2**63)


def write_splits(dataset: ray.data.Dataset, root: Path, fit: tuple[str, str] | None,
                 watch: Callable[[Path], Any] | None = None) -> tuple[dict[str, int], list | None]:
    """Write each split of a dataset with a `split` column (0 train, 1 val, 2 test) as Parquet files
    whose rows and order depend on the inputs and settings alone, not on how Ray Data happened to
    spread the work: file `part-00000j` of a split holds the rows whose keys fall in the j-th of
    equal ranges of the key space, sorted by key (then ORDER). A cache rebuilt on another machine
    or cluster then holds the same rows in the same files, which is what lets a resume or a second
    run of the same config train the same model from step 1.

    Two steps. The write tasks each write their rows as one file a split, sorted by key in small row
    groups (`SplitWriter`, under root/.parts, `watch(that folder)` around it for progress). Then one
    task a range reads the rows of its range from every such file (Parquet's row-group statistics
    skip the rest), sorts them and writes the range's file. Returns the splits' row counts and,
    given `fit` (column, per), the train rows' `FeatureStats`, combined in range order (a sum of
    floats depends on its order)."""
    parts = root / PARTS
    sink = SplitWriter(str(parts))
    with watch(parts) if watch else nullcontext():
        dataset.write_datasink(sink)
    writes = []
    for number, name in enumerate(SPLITS):
        rows = sink.rows[name]
        files = sorted(str(p) for p in (parts / name).glob("*.parquet"))
        count = max(-(-rows * sink.row_bytes // FILE_BYTES), min(MIN_FILES, -(-rows // MIN_FILE_ROWS)))
        for index in range(count if rows else 0):
            low, high = (-(KEYS // 2) + KEYS * i // count for i in (index, index + 1))
            writes.append(_write_range.remote(files, str(root / name / f"part-{index:06d}.parquet"), low, high,
                                              fit if number == 0 else None))
    stats = None
    combine = FeatureStats(*fit).combine if fit else None
    for _, returned in ray.get(writes):
        if combine and returned is not None:
            stats = combine(stats, returned)
    shutil.rmtree(parts, ignore_errors=True)  # absent where no row was written
    return dict(sink.rows), stats


class SplitWriter(ray.data.Datasink):
    """Writes each write task's rows as one Parquet file a split (`train/part-000007.parquet`),
    without the `split` column, sorted by key (and ORDER), in row groups of about a MiB, tensors as
    `dataprep.stream.encode_tensors` stores them. Each task returns its row counts; the driver adds
    them up. A retried task rewrites the same file names, and only its successful return is counted."""

    def __init__(self, root: str):
        self.root = root
        self.rows: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.row_bytes = 1
        """What a row takes as stored (fixed-width columns: the same however the rows were spread)."""

    def write(self, blocks, ctx) -> dict:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        rows, row_bytes = [0] * len(SPLITS), 1
        if not tables:
            return {"rows": rows, "row_bytes": row_bytes}
        table = pa.concat_tables(tables)
        order = [("key", "ascending"), *([(ORDER, "ascending")] if ORDER in table.column_names else [])]
        for number, name in enumerate(SPLITS):
            part = table.filter(pc.equal(table["split"], number)).drop_columns(["split"])
            rows[number] = part.num_rows
            if not part.num_rows:
                continue
            part = encode_tensors(part.sort_by(order))
            row_bytes = _row_bytes(part.schema)
            os.makedirs(f"{self.root}/{name}", exist_ok=True)
            # Read once more, by the range tasks, then removed: not worth compressing.
            pq.write_table(part, f"{self.root}/{name}/part-{ctx.task_idx:06d}.parquet",
                           row_group_size=max(16, (1 << 20) // row_bytes), compression="none")
        return {"rows": rows, "row_bytes": row_bytes}

    def on_write_complete(self, write_result) -> None:
        for returned in write_result.write_returns:
            for name, count in zip(SPLITS, returned["rows"]):
                self.rows[name] += count
            self.row_bytes = max(self.row_bytes, returned["row_bytes"])


def _row_bytes(schema) -> int:
    """Bytes a row of fixed-width columns takes (64 for a column of variable width)."""
    import pyarrow as pa

    return sum(field.type.byte_width if pa.types.is_fixed_size_binary(field.type) or pa.types.is_primitive(field.type)
               and field.type.bit_width >= 8 else 64 for field in schema)


@ray.remote(num_cpus=1)
def _write_range(files: list[str], path: str, low: int, high: int, fit: tuple[str, str] | None) -> tuple[int, list | None]:
    """One cached file: the rows of every write task's file with keys in [low, high), sorted by key
    (and ORDER, then dropped); given `fit`, its rows' `FeatureStats`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dataprep.stream import decode_tensors

    # The last range has no upper bound: 2**63 is past int64.
    bounds = [("key", ">=", low), *([("key", "<", high)] if high < KEYS // 2 else [])]
    tables = []
    for file in files:
        table = pq.read_table(file, filters=bounds)
        if table.num_rows:
            tables.append(table)
    if not tables:
        return 0, None
    part = pa.concat_tables(tables)
    order = [("key", "ascending"), *([(ORDER, "ascending")] if ORDER in part.column_names else [])]
    part = part.take(pc.sort_indices(part, sort_keys=order)).drop_columns([c for c in (ORDER,) if c in part.column_names])
    # One chunk, so that the file's bytes do not depend on how its rows were read in.
    part = part.combine_chunks()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(part, path)
    return part.num_rows, FeatureStats(*fit).aggregate_block(decode_tensors(part)) if fit else None


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
