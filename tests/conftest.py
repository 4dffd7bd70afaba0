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
    from dataprep.preprocess import preprocess
    from launcher.config import RunConfig

    out = tmp_path_factory.mktemp("digits") / "data"
    meta = preprocess(RunConfig().model_dump(mode="json")["data"], out)
    return out, meta
