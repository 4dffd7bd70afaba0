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


def peek_shape(data: dict, seq_len: int) -> tuple[list[int], int]:
    """The (input shape, number of classes) preprocessing will produce, read cheaply on the driver
    (a schema and the label column, not the whole dataset) so a run can be planned before it starts."""
    if data["format"] == "text":
        from dataprep.text import VOCAB_SIZE

        return [seq_len], VOCAB_SIZE
    if data["source"].startswith("sklearn:"):
        import sklearn.datasets

        name = data["source"].removeprefix("sklearn:")
        bunch = getattr(sklearn.datasets, f"load_{name}")()
        shape = data["image_shape"] or _BUNDLED_IMAGE_SHAPES.get(name) or [bunch.data.shape[1]]
        return list(shape), len(np.unique(bunch.target))
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    paths = _expand(data["source"])
    fmt = data["format"] if data["format"] != "auto" else _format_of(paths)
    dataset = pds.dataset(paths, format=fmt)
    label = data["label_column"]
    if label not in dataset.schema.names:
        raise DataError([f"data.label_column: {label!r} is not a column of {data['source']} (columns: {', '.join(dataset.schema.names)})"])
    features = data["feature_columns"] or [c for c in dataset.schema.names if c != label]
    classes = len(pc.unique(dataset.to_table(columns=[label])[label]))
    return list(data["image_shape"] or [len(features)]), classes
