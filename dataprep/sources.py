"""Finding the user's files and reading them as Ray Datasets.

Every reader tags each row with the file it came from (`__file`) and its 1-based row number in
that file (`__row`), so a bad value anywhere downstream is reported as `file, row N`. Files are
listed on the driver (local paths, globs, or any URI pyarrow's filesystems know), then read by
Ray Data tasks: tables through `FileBasedDatasource` (one file per read unit), images by decode
tasks that take a batch of files each.

A row that cannot be read goes, with `data.on_bad_rows: skip`, to the `BadRows` ledger (an actor
every task reports to, keyed by file and row, so a retried task does not count twice) instead of
stopping the run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FileBasedDatasource

from dataprep import DataError

FILE, ROW = "__file", "__row"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_EXTENSIONS = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "jsonl": (".jsonl", ".ndjson", ".json"),
               "images": IMAGE_EXTENSIONS, "python": (".py",)}
# Image shapes of the bundled datasets that are images.
BUNDLED_IMAGE_SHAPES = {"digits": [1, 8, 8]}


@dataclass
class Files:
    """The files a `data.source` names, with the filesystem to open them on."""

    paths: list[str]
    filesystem: pafs.FileSystem
    roots: list[str]  # the folders (or files) the source named: labels and keys are relative to them

    def relative(self, path: str) -> str:
        for root in self.roots:
            if path == root:
                return PurePosixPath(path).name
            if path.startswith(root.rstrip("/") + "/"):
                return path[len(root.rstrip("/")) + 1:]
        return path


STDLIB = "python-stdlib"


def sources_of(data: dict) -> list[str]:
    """`data.source` as a list; for text, `python-stdlib` is this Python's own library sources
    (real text on every machine, no download)."""
    import sysconfig

    sources = data["source"] if isinstance(data["source"], list) else [data["source"]]
    if data["format"] in ("text", "python") or (data.get("instructions") is not None and data["format"] == "auto"):
        return [sysconfig.get_paths()["stdlib"] if s == STDLIB else s for s in sources]
    return sources


def data_files(data: dict) -> Files:
    """The files a data section (not a bundled dataset) names, as preprocessing reads them."""
    fmt = data["format"]
    raw = data["source"] if isinstance(data["source"], list) else [data["source"]]
    if fmt == "auto" and data.get("instructions") is not None and STDLIB in raw:
        fmt = "python"  # this Python's library as instruction pairs
    return list_files(sources_of(data), data["text_glob"], {"images": IMAGE_EXTENSIONS, "python": (".py",)}.get(fmt))


def table_features(files: Files, fmt: str, data: dict) -> list[str]:
    """The feature columns of a table source, checked against its first file's columns."""
    columns = peek_columns(files, fmt)
    label, first = data["label_column"], files.paths[0]
    if label not in columns:
        raise DataError([f"data.label_column: {label!r} is not a column of {first} (columns: {', '.join(columns)})"])
    features = data["feature_columns"] or [c for c in columns if c not in (label, data["key_column"])]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError([f"data.feature_columns: {', '.join(missing)} not in {first} (columns: {', '.join(columns)})"])
    if not features:
        raise DataError([f"data.feature_columns: {first} has no feature columns besides the label"])
    return features


def list_files(sources: list[str], pattern: str = "**/*", extensions: tuple[str, ...] | None = None) -> Files:
    """Expand sources (files, folders, globs; local paths or URIs) to a sorted list of files."""
    filesystem, paths, roots = None, [], []
    for source in sources:
        fs, found, root = _expand(source, pattern, extensions)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise DataError([f"data.source: {source!r} is on a different filesystem from {sources[0]!r}; keep the sources on one"])
        filesystem = fs
        paths += found
        roots.append(root)
    return Files(sorted(set(paths)), filesystem, roots)


def _expand(source: str, pattern: str, extensions) -> tuple[pafs.FileSystem, list[str], str]:
    import glob as globbing

    if "://" not in source and globbing.has_magic(source):
        matches = sorted(globbing.glob(source, recursive=True))
        if not matches:
            raise DataError([f"data.source: no file or folder matches {source!r}"])
        files = []
        for match in matches:
            files += _expand(match, pattern, extensions)[1]
        return pafs.LocalFileSystem(), files, os.path.abspath(os.path.dirname(source.split("*")[0]) or ".")
    if "://" in source and globbing.has_magic(source):
        return _expand_uri_glob(source, pattern, extensions)
    try:
        fs, path = pafs.FileSystem.from_uri(source) if "://" in source else (pafs.LocalFileSystem(), os.path.abspath(source))
        info = fs.get_file_info(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError([f"data.source: cannot open {source!r}: {exc}"]) from None
    if info.type == pafs.FileType.NotFound:
        raise DataError([f"data.source: no such file or folder {source!r}"])
    if info.type == pafs.FileType.File:
        return fs, [path], path
    listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [i.path for i in listed if i.type == pafs.FileType.File
             and not _bookkeeping(i.path[len(path):])
             and glob_regex(pattern).fullmatch(i.path[len(path):].lstrip("/"))
             and (extensions is None or i.path.lower().endswith(extensions))]
    if not files:
        what = f"{', '.join(extensions)} files" if extensions else f"files matching {pattern!r}"
        raise DataError([f"data.source: the folder {source!r} holds no {what}"])
    return fs, files, path


def _expand_uri_glob(source: str, pattern: str, extensions) -> tuple[pafs.FileSystem, list[str], str]:
    """A glob in a URI (`s3://bucket/logs/2026-*/*.parquet`): list the folder above its first
    wildcard and match the rest, as `glob` would; a matched folder contributes its files that
    match `pattern`."""
    cut = min(source.find(c) for c in "*?[" if c in source)
    base = source[:source.rfind("/", 0, cut)]
    try:
        fs, root = pafs.FileSystem.from_uri(base)
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError([f"data.source: cannot open {source!r}: {exc}"]) from None
    wanted, inside = glob_regex(source[len(base) + 1:].rstrip("/")), glob_regex(pattern)
    files = []
    for info in listed:
        relative = info.path[len(root):].lstrip("/")
        parts = relative.split("/")
        if (info.type != pafs.FileType.File or _bookkeeping(relative)
                or (extensions is not None and not relative.lower().endswith(extensions))):
            continue
        if wanted.fullmatch(relative) or any(wanted.fullmatch("/".join(parts[:k])) and inside.fullmatch("/".join(parts[k:]))
                                              for k in range(1, len(parts))):
            files.append(info.path)
    if not files:
        raise DataError([f"data.source: no file or folder matches {source!r}"])
    return fs, sorted(files), root


def _bookkeeping(relative: str) -> bool:
    """Hidden files and folders, and the markers Spark and Hadoop leave beside their output."""
    parts = PurePosixPath(relative).parts
    return any(p.startswith(".") for p in parts) or parts[-1] in ("_SUCCESS", "_metadata", "_common_metadata")


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex on '/'-separated relative paths: `**/` any folders (or none), `*`, `?` and
    `[...]` / `[!...]` within one name (what `glob.glob(..., recursive=True)` does, for any filesystem)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern[i] == "[" and (end := _class_end(pattern, i)) is not None:
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = re.sub(r"([\\^\[])", r"\\\1", body[1:] if negate else body)  # literal ^ [ and \ in the class
            out, i = out + (f"[^/{body}]" if negate else f"(?!/)[{body}]"), end + 1
            continue
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _class_end(pattern: str, start: int) -> int | None:
    """The index of the `]` closing the character class opened at `start` (a `]` first in the
    class is a member, as in fnmatch); None where it is never closed (then `[` is a literal)."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    end = pattern.find("]", j)
    return None if end < 0 else end


def format_of(files: Files) -> str:
    """`data.format: auto`: the format every file's extension agrees on."""
    formats = set()
    for path in files.paths:
        kind = next((k for k, exts in _EXTENSIONS.items() if path.lower().endswith(exts)), None)
        if kind is None:
            raise DataError([f"data.format: cannot tell the format of {path} from its extension; "
                             f"set data.format (parquet, csv, jsonl, images or text)"])
        formats.add(kind)
    if len(formats) > 1:
        raise DataError([f"data.format: the sources mix {', '.join(sorted(formats))} files; read one format per run"])
    return formats.pop()


# ---------------------------------------------------------------------------------------------
# Bad rows


@ray.remote(num_cpus=0)
class BadRows:
    """Rows dropped under `on_bad_rows: skip`, per file: row numbers (a set, so a retried task
    does not count them twice) and the first reason seen."""

    def __init__(self):
        self.rows: dict[str, set] = {}
        self.reasons: dict[str, str] = {}

    def add(self, entries: list[tuple[str, int, str]]) -> None:
        for file, row, reason in entries:
            self.rows.setdefault(file, set()).add(row)
            self.reasons.setdefault(file, reason)

    def report(self) -> dict[str, dict]:
        return {file: {"rows": len(rows), "example": self.reasons[file]} for file, rows in sorted(self.rows.items())}


class Problems:
    """Where a reader or transform sends a bad row: an error (`fail`) or the ledger (`skip`)."""

    def __init__(self, ledger=None):
        self.ledger = ledger

    def __call__(self, entries: list[tuple[str, int, str]]) -> None:
        if not entries:
            return
        if self.ledger is None:
            file, row, reason = entries[0]
            more = f" ({len(entries) - 1} more bad row(s) in this batch)" if len(entries) > 1 else ""
            where = f"{file}, row {row}" if row else file
            raise DataError([f"{where}: {reason}{more}; fix the data, or set data.on_bad_rows: skip to drop such rows"])
        ray.get(self.ledger.add.remote(entries))


# ---------------------------------------------------------------------------------------------
# Readers


class TableFiles(FileBasedDatasource):
    """CSV (every column read as text; numbers are parsed later, row by row), JSONL or Parquet, in
    blocks of `rows` rows. A block never holds rows of two files: the encoding takes one block at
    a time, so a file whose columns differ from the others' is seen as it is, not with the other
    files' columns filled in with nulls."""

    def __init__(self, files: Files, fmt: str, problems: Problems, rows: int, prompt_bytes: int | None = None):
        super().__init__(files.paths, filesystem=files.filesystem)
        self.fmt, self.problems, self.rows, self.prompt_bytes = fmt, problems, rows, prompt_bytes

    def _read_stream(self, f, path: str):
        if self.fmt == "python":
            from dataprep.python_functions import function_pairs

            pairs = function_pairs(f.readall().decode("utf-8", "replace"), self.prompt_bytes)
            lines = pairs.pop("line")
            tables = [pa.table(pairs).append_column(FILE, pa.array([path] * len(lines), pa.string()))
                      .append_column(ROW, pa.array(lines, pa.int64()))] if lines else []
        else:
            tables = {"parquet": _parquet, "csv": _csv, "jsonl": _jsonl}[self.fmt](f, path, self.problems)
        for table in tables:
            for start in range(0, table.num_rows, self.rows):
                yield table.slice(start, self.rows)


def _tagged(table: pa.Table, path: str, first_row: int) -> pa.Table:
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    return table.append_column(FILE, pa.array([path] * table.num_rows, pa.string())).append_column(ROW, rows)


def _parquet(f, path: str, problems: Problems):
    import pyarrow.parquet as pq

    try:  # Parquet needs to seek (its footer is at the end); the read stream cannot
        parquet = pq.ParquetFile(pa.BufferReader(f.readall()))
    except (pa.ArrowInvalid, OSError) as exc:
        problems([(path, 0, f"not a readable Parquet file ({exc})")])
        return
    row = 1
    for batch in parquet.iter_batches(batch_size=65536):
        yield _tagged(pa.Table.from_batches([batch]), path, row)
        row += batch.num_rows


def _csv(f, path: str, problems: Problems):
    import pyarrow.csv as pcsv

    data = f.readall()
    header = next(csv.reader(io.StringIO(data[: data.find(b"\n") if b"\n" in data else len(data)].decode("utf-8", "replace"))), [])
    if not header:
        return
    bad = []

    def invalid_row(row) -> str:
        # row.number is the line in the file (the header is line 1): data row = number - 1
        bad.append((path, row.number - 1 if row.number else 0,
                    f"{row.actual_columns} fields where the header has {row.expected_columns}"))
        return "skip"

    try:
        table = pcsv.read_csv(pa.BufferReader(data), parse_options=pcsv.ParseOptions(invalid_row_handler=invalid_row),
                              convert_options=pcsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                                                  strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        problems([(path, 0, f"not readable as CSV ({exc})")])
        return
    problems(bad)
    if bad:  # skipped rows shift the numbering: number rows by their position in the file instead
        numbers = np.setdiff1d(np.arange(1, table.num_rows + len(bad) + 1), [r for _, r, _ in bad])
        yield table.append_column(FILE, pa.array([path] * table.num_rows, pa.string())).append_column(ROW, pa.array(numbers))
    else:
        yield _tagged(table, path, 1)


def _jsonl(f, path: str, problems: Problems):
    import pyarrow.json as pjson

    data = f.readall()
    try:
        yield _tagged(pjson.read_json(pa.BufferReader(data)), path, 1)
        return
    except pa.ArrowInvalid:
        pass  # a column whose type changes between rows, or a line that is not JSON: go line by line
    rows, numbers, bad = [], [], []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append((path, number, f"not JSON ({exc.msg})"))
            continue
        if not isinstance(value, dict):
            bad.append((path, number, "not a JSON object"))
            continue
        rows.append({k: v if v is None or isinstance(v, str) else json.dumps(v) for k, v in value.items()})
        numbers.append(number)
    problems(bad)
    if rows:
        table = pa.Table.from_pylist(rows)
        yield table.append_column(FILE, pa.array([path] * len(rows), pa.string())).append_column(ROW, pa.array(numbers, pa.int64()))


def decode_images(batch: dict, filesystem, mode: str, size, problems: Problems) -> dict:
    """Decode a batch of image files with Pillow to `mode`, resized to `size` (height, width) if
    given, as [C, H, W] uint8. (The label is the file's folder: `dataprep.preprocess` takes it from
    the path.)"""
    from PIL import Image

    images, paths, bad = [], [], []
    for path in (str(p) for p in batch["path"]):
        try:
            with filesystem.open_input_stream(path) as f, Image.open(io.BytesIO(f.readall())) as image:
                image = image.convert(mode)
                if size is not None:
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            # Pillow names the in-memory buffer it read from (`<_io.BytesIO object at 0x...>`), not the file.
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
            bad.append((path, 0, f"not a readable image ({type(exc).__name__}: {reason})"))
            continue
        images.append((pixels[:, :, None] if pixels.ndim == 2 else pixels).transpose(2, 0, 1))
        paths.append(path)
    problems(bad)
    same = len({i.shape for i in images}) <= 1
    return {"image": np.stack(images) if same and images else np.array(images + [None], dtype=object)[:-1],
            FILE: np.array(paths, dtype=object), ROW: np.ones(len(paths), np.int64)}


def image_mode(files: Files) -> tuple[str, list[int]]:
    """The Pillow mode to decode every image to (L for greyscale, RGB otherwise), and the first
    image's [channels, height, width]: read on the driver from one file's header."""
    from PIL import Image

    with files.filesystem.open_input_file(files.paths[0]) as f, Image.open(io.BytesIO(f.read())) as image:
        mode = "L" if image.mode in ("1", "L", "I;16", "I") else "RGB"
        return mode, [1 if mode == "L" else 3, image.height, image.width]


def read_tables(files: Files, fmt: str, problems: Problems, rows: int, prompt_bytes: int | None = None) -> ray.data.Dataset:
    """`fmt` python: each file's functions as instruction pairs, prompts of at most `prompt_bytes`."""
    return ray.data.read_datasource(TableFiles(files, fmt, problems, rows, prompt_bytes))


DECODED_BYTES_PER_TASK = 64 << 20  # pixels one image-decoding task makes, at most


def read_images(files: Files, mode: str, shape: list[int], size, problems: Problems, seed: int) -> ray.data.Dataset:
    """Image files decoded by Ray Data tasks. Few, large tasks: each costs about 0.1 s to schedule
    on a busy 2-CPU machine, as long as decoding 300 small images. So a task takes up to 64 MB of
    decoded pixels (from `shape`, the first image's), and there are at least 4 per CPU to keep
    every CPU busy until the end. The files go in a seeded random order: listed, they are sorted
    by class folder, and a task (so a cached file, streamed in order to training) would hold one
    or two classes."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(16, DECODED_BYTES_PER_TASK // max(1, math.prod(shape)))
    tasks = min(len(files.paths), max(4 * cpus, -(-len(files.paths) // per_task)))
    order = np.random.default_rng(seed).permutation(len(files.paths))
    paths = ray.data.from_items([{"path": files.paths[i]} for i in order], override_num_blocks=tasks)
    return paths.map_batches(decode_images, fn_kwargs={"filesystem": files.filesystem, "mode": mode, "size": size,
                                                       "problems": problems},
                             batch_size=-(-len(files.paths) // tasks), batch_format="numpy")


def read_bundled(name: str, label_column: str) -> ray.data.Dataset:
    """A scikit-learn bundled dataset (no download: the files ship inside scikit-learn)."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    table = pa.table({**{n: bunch.data[:, i].astype(np.float32) for i, n in enumerate(names)}, label_column: bunch.target})
    table = _tagged(table, f"sklearn:{name}", 1)
    # Several blocks so the preprocessing below runs as parallel tasks, not one.
    step = -(-table.num_rows // 8)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def peek_columns(files: Files, fmt: str) -> list[str]:
    """The first file's column names, read cheaply on the driver (a Parquet footer, a CSV header,
    a JSONL first line), to name the feature columns and plan the run."""
    first = files.paths[0]
    if fmt == "python":
        from dataprep.python_functions import PROMPT, RESPONSE

        return [PROMPT, RESPONSE]
    with files.filesystem.open_input_file(first) as f:
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return pq.read_schema(f).names
            head = f.read(1 << 20).decode("utf-8", "replace")
        except (pa.ArrowInvalid, OSError) as exc:
            name = {"parquet": "Parquet", "csv": "CSV", "jsonl": "JSONL"}[fmt]
            raise DataError([f"{first}: not a readable {name} file ({exc}); fix or remove it"]) from None
    if fmt == "csv":
        return next(csv.reader(io.StringIO(head)), [])
    line = next((line for line in head.splitlines() if line.strip()), "")
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        raise DataError([f"{first}, row 1: not JSON; data.format jsonl wants one JSON object per line"]) from None
    return list(value) if isinstance(value, dict) else []
