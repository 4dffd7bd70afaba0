"""What preprocessing will produce, read cheaply on the driver before anything runs (a schema, a
header, the class folders, one image), so a run can be planned and refused before it starts."""

from __future__ import annotations

import numpy as np

from dataprep import find_transform, label_classes
from dataprep.sources import BUNDLED_IMAGE_SHAPES, data_files, format_of, image_mode, sources_of, table_features
from dataprep.preprocess import class_folders
from dataprep.transforms import model_input_shape
from runconfig.schema import AUGMENTATIONS


def peek_shape(data: dict, seq_len: int, model_task: str = "auto") -> tuple[list[int], int]:
    """(the model's input shape, the number of classes or the vocabulary size). A classifier of a
    table's text column (`model_task`, see `dataprep.text_tables.text_task`) counts its labels."""
    transforms = data["transforms"]
    if data["format"] == "text" or data["text_column"] is not None or data.get("instructions") is not None:
        from dataprep.text import tokenizer_of
        from dataprep.text_tables import text_task

        if text_task(data, model_task) == "classify":
            files = data_files(data)
            fmt = format_of(files) if data["format"] == "auto" else data["format"]
            return [seq_len], _count_labels(files, fmt, data["label_column"])
        spec = tokenizer_of(data)
        return [seq_len], 256 if spec["tokenizer"] == "bytes" else spec["vocab_size"]
    given = label_classes(transforms)
    augment = [t for t in transforms if t["type"] in AUGMENTATIONS]
    sources = sources_of(data)
    if sources[0].startswith("sklearn:"):
        import sklearn.datasets

        name = sources[0].removeprefix("sklearn:")
        bunch = getattr(sklearn.datasets, f"load_{name}")()
        shape = data["image_shape"] or BUNDLED_IMAGE_SHAPES.get(name) or [bunch.data.shape[1]]
        return _shape(shape, augment), len(given or np.unique(bunch.target))
    files = data_files(data)
    fmt = format_of(files) if data["format"] == "auto" else data["format"]
    if fmt == "images":
        _, shape = image_mode(files)
        resize = find_transform(transforms, "resize")
        shape = [shape[0], *resize["size"]] if resize else shape
        return model_input_shape(shape, augment), len(given or class_folders(files))
    features = table_features(files, fmt, data)
    shape = _shape(data["image_shape"] or [len(features)], augment)
    return shape, len(given) if given else _count_labels(files, fmt, data["label_column"])


def _shape(shape: list[int], augment: list[dict]) -> list[int]:
    return model_input_shape(shape, augment) if len(shape) == 3 else list(shape)


def _count_labels(files, fmt: str, label: str) -> int:
    """Distinct labels, reading only the label column (Parquet) or the files' text (CSV, JSONL)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if fmt == "csv":
        import pyarrow.csv as pcsv

        file_format = pds.CsvFileFormat(convert_options=pcsv.ConvertOptions(column_types={label: pa.string()}))
    else:
        file_format = "json" if fmt == "jsonl" else fmt
    try:
        dataset = pds.dataset(files.paths, format=file_format, filesystem=files.filesystem)
        return len(pc.unique(dataset.to_table(columns=[label])[label].cast(pa.string())))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
        return 2  # files preprocessing will name as bad; the plan only needs a head size
