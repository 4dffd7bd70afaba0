"""The cached splits on disk, and streaming them to the training workers.

On disk, a tensor column (image pixels, token blocks) is stored as one fixed-size binary value per
row, its dtype and shape in the file's schema metadata. Parquet stores a list column with two
levels per element, and decoding those was most of the time an epoch took to stream: 0.40 s for
14k 3x32x32 images, 0.19 s as binary.

The dataset handed to Ray Train reads the split's Parquet files in batches as the workers consume
it (Ray Train's `streaming_split` gives each rank an equal share), so no process ever holds the
whole split. Its read tasks ask for no CPU: a worker group may hold every CPU of the cluster
(2 workers on 2 CPUs), and Ray Data's own file listing and read tasks, asking for one, would
then wait forever (Ray PR #41603 is the same starvation between Train and Data). Reading a cached
split is light I/O; the heavy work was done by the preprocess stage, with the CPUs free.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.extensions import ArrowTensorArray, ArrowTensorType, ArrowTensorTypeV2

from cluster.remote import filesystem

READ_ROWS = 4096  # rows per batch read from a Parquet file
READ_TASKS = 2  # read tasks at once
TENSORS = b"raylaunch.tensors"  # schema metadata: {column: {"dtype": ..., "shape": [...]}}


def encode_tensors(table: pa.Table) -> pa.Table:
    """The table with each Ray tensor column as fixed-size binary, described in the metadata."""
    tensors = {}
    for index, field in enumerate(table.schema):
        if not isinstance(field.type, (ArrowTensorType, ArrowTensorTypeV2)):
            continue
        values = np.ascontiguousarray(table[field.name].combine_chunks().to_numpy())
        width = int(np.prod(field.type.shape)) * values.dtype.itemsize
        binary = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)])
        table = table.set_column(index, field.name, binary)
        tensors[field.name] = {"dtype": values.dtype.str, "shape": list(field.type.shape)}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), TENSORS: json.dumps(tensors).encode()})


def decode_tensors(table: pa.Table, tensors: dict | None = None) -> pa.Table:
    """The inverse of `encode_tensors`: tensor columns Ray Data turns into numpy or torch batches."""
    if tensors is None:
        tensors = json.loads((table.schema.metadata or {}).get(TENSORS, b"{}"))
    for name, spec in tensors.items():
        column = table[name].combine_chunks()
        dtype, shape = np.dtype(spec["dtype"]), spec["shape"]
        width = int(np.prod(shape)) * dtype.itemsize
        data = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width, offset=column.offset * width)
        values = data.view(dtype).reshape(len(column), *shape)
        table = table.set_column(table.schema.get_field_index(name), name, ArrowTensorArray.from_numpy(values))
    return table


def parquet_files(folder: Path | str) -> list[str]:
    fs, root = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def stream_split(data_dir: Path | str, split: str) -> ray.data.Dataset:
    """A lazy dataset over one cached split, in file order (deterministic for a resume)."""
    return stream_folder(f"{data_dir}/{split}")


def split_bytes(data_dir: Path | str, split: str) -> int:
    """What one cached split takes decoded: its row groups' uncompressed sizes, from the files' footers."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(f"{data_dir}/{split}")
    total = 0
    for path in parquet_files(f"{data_dir}/{split}"):
        with fs.open_input_file(path) as file:
            metadata = pq.read_metadata(file)
        total += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return total


def held_split(data_dir: Path | str, split: str) -> ray.data.Dataset:
    """One cached split read here, once, into Ray's object store: the blocks `stream_split` streams,
    in the same order, and no read tasks to start again every epoch. Neither the read nor the
    dataset starts a Ray worker: `ray.data.from_arrow` would run a task a table to compute metadata
    of tables this process holds (Ray 2.60), and start worker processes for it; `from_blocks`
    computes it here. (Training cuts it into one shard a rank: `trainers.fit.rank_shards`.)"""
    tables = list(_read_files(pa.table({"path": parquet_files(f"{data_dir}/{split}")})))
    return ray.data.from_blocks(tables) if tables else stream_split(data_dir, split)


def stream_folder(folder: Path | str) -> ray.data.Dataset:
    files = parquet_files(folder)
    # A few long-lived read tasks, each taking several files: zero-CPU tasks are not limited by
    # Ray Data's CPU budget, and one task per small file started a worker process per file.
    return ray.data.from_items([{"path": p} for p in files]).map_batches(
        _read_files, batch_size=max(1, len(files) // 8), num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, min(READ_TASKS, len(files)))),
        batch_format="pyarrow")


def _read_files(batch: pa.Table):
    import pyarrow.parquet as pq

    for path in batch["path"].to_pylist():
        parquet = pq.ParquetFile(path)
        tensors = json.loads((parquet.schema_arrow.metadata or {}).get(TENSORS, b"{}"))
        for record_batch in parquet.iter_batches(batch_size=READ_ROWS):
            yield decode_tensors(pa.Table.from_batches([record_batch]), tensors)
