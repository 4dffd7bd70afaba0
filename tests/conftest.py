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


def sweep_config(tmp_path, cache, tune: dict, **train) -> str:
    """A sweep config file in `tmp_path`: the quickstart's data (cached in `cache`) with a small
    MLP and 1-worker trials (two at a time on 2 CPUs); `tune` and `train` override its sections.
    The run directory is `tmp_path / "run"`."""
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "quickstart.yaml").read_text())
    raw["data"]["cache_dir"] = str(cache)
    raw["model"] = {"type": "mlp", "width": 32, "depth": 1}
    raw["train"] |= {"workers": 1, "epochs": 3, "micro_batch_size": 64, "lr_schedule": "constant"} | train
    raw["tune"] = {"enabled": True, "metric": "val_accuracy"} | tune
    raw["output"] = {"dir": str(tmp_path / "run")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)
