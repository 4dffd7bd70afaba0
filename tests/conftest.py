"""One local Ray cluster for the whole suite (2 CPUs, like CI), started lazily by tests that need it."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="session")
def ray_cluster():
    # The pipeline joins an existing connection and leaves it running (cluster.session.ray_session).
    ray.init(num_cpus=2, log_to_driver=False, logging_level="error")
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_data(ray_cluster, tmp_path_factory):
    """The digits dataset preprocessed once for the training tests."""
    from dataprep.cache import prepare
    from launcher.config import RunConfig

    data = RunConfig().model_dump(mode="json")["data"] | {"transforms": [{"type": "standardize", "per": "feature"}]}
    meta, out, _ = prepare(data, 128, tmp_path_factory.mktemp("digits"))
    return out, meta


@pytest.fixture(scope="session")
def quickstart_cache(tmp_path_factory):
    """A data cache shared by the tests that run the quickstart's data (`--set data.cache_dir=`):
    the first one preprocesses it, the rest reuse the entry."""
    return tmp_path_factory.mktemp("quickstart-cache")


def data_meta(run_dir) -> dict:
    """The metadata of the preprocessed data a run used (in the cache entry its data.json names)."""
    import json
    from pathlib import Path

    return json.loads((Path(json.loads((Path(run_dir) / "data.json").read_text())["path"]) / "meta.json").read_text())
