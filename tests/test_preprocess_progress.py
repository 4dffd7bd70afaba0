"""The preprocessing bar's numbers: rows expected before it starts, rows written while it runs."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.cache import _watch, expected_rows
from dataprep.sources import data_files
from runconfig.schema import RunConfig


def _data(**fields) -> dict:
    return RunConfig().model_dump(mode="json")["data"] | fields


def test_expected_rows_from_parquet_footers_and_image_files(tmp_path):
    for i, n in enumerate((5, 7)):
        pq.write_table(pa.table({"x": list(range(n)), "label": [0] * n}), tmp_path / f"part{i}.parquet")
    data = _data(source=str(tmp_path / "*.parquet"), label_column="label")
    assert expected_rows(data, data_files(data)) == 12
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"")
    data = _data(source=str(tmp_path / "images"), format="images")
    assert expected_rows(data, data_files(data)) == 3
    (tmp_path / "rows.csv").write_text("x,label\n1,0\n")
    data = _data(source=str(tmp_path / "rows.csv"), label_column="label")
    assert expected_rows(data, data_files(data)) is None  # CSV: known only by reading it


def test_rows_written_are_reported_while_files_appear(tmp_path):
    seen: list[tuple[int, int | None]] = []
    written = threading.Event()

    def progress(rows, expected):
        seen.append((rows, expected))
        if rows:
            written.set()

    with _watch(tmp_path, progress, 10, every=0.05):
        (tmp_path / "train").mkdir()
        pq.write_table(pa.table({"x": list(range(4))}), tmp_path / "train" / "part-000000.parquet")
        assert written.wait(5)  # reported while the block still runs
        (tmp_path / "half.parquet").write_bytes(b"PAR1")  # a file still being written: no footer yet
        pq.write_table(pa.table({"x": list(range(6))}), tmp_path / "train" / "part-000001.parquet")
    assert seen[-1] == (10, 10)
