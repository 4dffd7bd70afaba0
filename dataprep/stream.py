"""Streaming a cached split to the training workers.

The dataset handed to Ray Train reads the split's Parquet files in batches as the workers consume
it (Ray Train's `streaming_split` gives each rank an equal share), so no process ever holds the
whole split. Its read tasks ask for no CPU: a worker group may hold every CPU of the cluster
(2 workers on 2 CPUs), and Ray Data's own file listing and read tasks, asking for one, would
then wait forever (Ray PR #41603 is the same starvation between Train and Data). Reading a cached
split is light I/O; the heavy work was done by the preprocess stage, with the CPUs free.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

READ_ROWS = 4096  # rows per batch read from a Parquet file
READ_TASKS = 2  # read tasks at once


def split_files(data_dir: Path | str, split: str) -> list[str]:
    fs, root = pafs.FileSystem.from_uri(str(data_dir)) if "://" in str(data_dir) else (pafs.LocalFileSystem(), str(Path(data_dir).resolve()))
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{split}", recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def stream_split(data_dir: Path | str, split: str) -> ray.data.Dataset:
    """A lazy dataset over one cached split, in file order (deterministic for a resume)."""
    files = split_files(data_dir, split)
    # A few long-lived read tasks, each taking several files: zero-CPU tasks are not limited by
    # Ray Data's CPU budget, and one task per small file started a worker process per file.
    return ray.data.from_items([{"path": p} for p in files]).map_batches(
        _read_files, batch_size=max(1, len(files) // 8), num_cpus=0, concurrency=READ_TASKS, batch_format="pyarrow")


def _read_files(batch: pa.Table):
    import pyarrow.parquet as pq

    for path in batch["path"].to_pylist():
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS):
            yield pa.Table.from_batches([record_batch])
