"""Reading `data.source` into a Ray Dataset: bundled scikit-learn datasets or Parquet/CSV files."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from dataprep import DataError

# Image shapes of the bundled datasets that are images.
_BUNDLED_IMAGE_SHAPES = {"digits": [1, 8, 8]}


def read_source(source: str, file_format: str, label_column: str) -> tuple[ray.data.Dataset, list[int] | None]:
    """Open `source` lazily as a Ray Dataset; returns it and the bundled image shape, if any."""
    if source.startswith("sklearn:"):
        name = source.removeprefix("sklearn:")
        return _bundled(name, label_column), _BUNDLED_IMAGE_SHAPES.get(name)
    paths = _expand(source)
    fmt = file_format if file_format != "auto" else _format_of(paths)
    reader = ray.data.read_parquet if fmt == "parquet" else ray.data.read_csv
    return reader(paths), None


def _bundled(name: str, label_column: str) -> ray.data.Dataset:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    table = pa.table({**{n: bunch.data[:, i].astype(np.float32) for i, n in enumerate(names)}, label_column: bunch.target})
    # Several blocks so the preprocessing below runs as parallel tasks, not one.
    step = -(-table.num_rows // 8)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def _expand(source: str) -> list[str]:
    if "://" in source:
        return [source]
    paths = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
    if not paths:
        raise DataError([f"data.source: no file or folder matches {source!r}"])
    return paths


def _format_of(paths: list[str]) -> str:
    suffixes = set()
    for p in paths:
        if Path(p).is_dir():
            suffixes |= {f.suffix.lower() for f in Path(p).rglob("*") if f.is_file()}
        else:
            suffixes.add(Path(p).suffix.lower())
    if suffixes <= {".parquet", ".pq"}:
        return "parquet"
    if suffixes <= {".csv"}:
        return "csv"
    raise DataError([f"data.format: cannot tell the format of {paths[0]!r} from its extension(s) {sorted(suffixes)}; set data.format: parquet or csv"])
