"""A rank's shard of a split held in memory, read once into the rank (cluster.raycompat.HeldShard): every
pass gives each row once, in file order or in a permutation drawn from the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def held(ray_cluster):
    import ray.data

    from cluster.raycompat import HeldShard

    rows = 103
    blocks = ray.data.from_numpy(np.arange(rows)).repartition(4)  # several blocks, as a cut shard has
    dataset = blocks.map_batches(lambda b: {"key": b["data"], "features": np.stack([b["data"]] * 3, 1).astype(np.float32)})
    return HeldShard(dataset.materialize().iterator()), rows


def _keys(batches) -> list[list[int]]:
    return [batch["key"].tolist() for batch in batches]


def test_an_unshuffled_pass_is_the_shard_in_order_with_the_last_batch_short(held):
    shard, rows = held
    batches = list(shard.iter_torch_batches(batch_size=10, device="cpu"))
    assert [len(b) for b in _keys(batches)] == [10] * 10 + [3]
    assert sum(_keys(batches), []) == list(range(rows))
    assert torch.equal(batches[0]["features"][:, 2], batches[0]["key"].float())  # rows stay whole


def test_a_shuffled_pass_is_a_permutation_drawn_from_its_seed(held):
    shard, rows = held

    def keys(seed: int) -> list[list[int]]:
        return _keys(shard.iter_torch_batches(batch_size=10, device="cpu", drop_last=True,
                                              local_shuffle_buffer_size=1000, local_shuffle_seed=seed))

    first = keys(1)
    assert [len(b) for b in first] == [10] * 10  # drop_last: the 3 left over are not trained this pass
    flat = sum(first, [])
    assert len(set(flat)) == 100 and set(flat) <= set(range(rows)) and flat != sorted(flat)
    assert keys(1) == first  # a resumed run sees the same order
    assert keys(2) != first
