"""The cached splits' on-disk form: tensor columns as fixed-size binary, read back as the same
tensors. Pure functions and local Parquet files, no Ray cluster."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.extensions import ArrowTensorArray

from dataprep.stream import decode_tensors, encode_tensors, split_bytes


def test_tensor_columns_round_trip_through_parquet(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    tokens = rng.integers(0, 50_000, (5, 9), dtype=np.int32)
    table = pa.table({"features": ArrowTensorArray.from_numpy(pixels), "tokens": ArrowTensorArray.from_numpy(tokens),
                      "label": np.arange(5), "key": rng.integers(-2**62, 2**62, 5)})
    encoded = encode_tensors(table)
    assert pa.types.is_fixed_size_binary(encoded.schema.field("features").type) and encoded.schema.field("label").type == pa.int64()
    pq.write_table(encoded, tmp_path / "part.parquet")
    back = decode_tensors(pq.read_table(tmp_path / "part.parquet"))
    np.testing.assert_array_equal(back["features"].combine_chunks().to_numpy(), pixels)
    np.testing.assert_array_equal(back["tokens"].combine_chunks().to_numpy(), tokens)
    assert back["tokens"].combine_chunks().to_numpy().dtype == np.int32
    assert back["label"].to_pylist() == list(range(5)) and back["key"].equals(table["key"])
    # A slice (as a reader's record batch is) decodes from its own offset.
    sliced = decode_tensors(encoded.slice(2, 2))
    np.testing.assert_array_equal(sliced["features"].combine_chunks().to_numpy(), pixels[2:4])


def test_a_table_without_tensors_is_unchanged():
    table = pa.table({"features": [1.0, 2.0], "label": [0, 1]})
    assert decode_tensors(encode_tensors(table)).equals(table)


def test_a_splits_decoded_size_and_whether_auto_holds_it_in_memory(tmp_path):
    from trainers.fit import IN_MEMORY_SHARE, hold_in_memory

    tokens = np.arange(4000 * 129, dtype=np.int32).reshape(4000, 129)  # incompressible enough: 2 MB as stored
    (tmp_path / "train").mkdir()
    table = encode_tensors(pa.table({"tokens": ArrowTensorArray.from_numpy(tokens)}))
    pq.write_table(table.slice(0, 2500), tmp_path / "train" / "a.parquet", row_group_size=1000)
    pq.write_table(table.slice(2500), tmp_path / "train" / "b.parquet")
    size = split_bytes(tmp_path, "train")
    assert tokens.nbytes <= size < 1.05 * tokens.nbytes  # every row group of both files, decoded

    store = 100 * 2**20
    one_run = store // (2 * IN_MEMORY_SHARE)  # the splits and one run's shards cut from them
    assert hold_in_memory(one_run, store, None)
    assert not hold_in_memory(one_run + 1, store, None)
    assert hold_in_memory(store // (4 * IN_MEMORY_SHARE), store, None, trainers=3)  # a sweep's 3 trials at once
    assert not hold_in_memory(store // (4 * IN_MEMORY_SHARE) + 1, store, None, trainers=3)
    assert not hold_in_memory(2 * 2**20, store, ingest_memory_mb=1)  # never past data.ingest_memory_mb
    assert hold_in_memory(2**20, store, ingest_memory_mb=1)
