"""One local Ray cluster for the whole suite (2 CPUs, like CI), started lazily by tests that need it,
and a Ray head in processes of its own for the tests that submit jobs to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_cluster():
    # The pipeline joins an existing connection and leaves it running (cluster.session.ray_session).
    ray.init(num_cpus=2, log_to_driver=False, logging_level="error")
    yield ray.cluster_resources()
    ray.shutdown()


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A Ray head on loopback, as `raylaunch submit` finds one on a cluster: token auth on (its token
    in a file of its own, not ~/.ray), 2 CPUs, ports of its own beside the in-process cluster's.
    `ray start --block` keeps every process it starts in its process group, stopped by that group."""
    root = tmp_path_factory.mktemp("head")
    token = root / "token"
    token.write_text(os.urandom(16).hex())
    gcs, dashboard, agent, agent_grpc, runtime_env_port, metrics, client = _free_ports(7)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                        # SIGTERM at teardown stops it at once (it would drain the node for 30 s)
                        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_port}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", "--num-cpus=2",
         "--object-store-memory=400000000", "--disable-usage-stats", f"--temp-dir={root / 'ray'}"],
        env=env, stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    import requests

    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token.read_text()}"},
                            timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert process.poll() is None and time.monotonic() < deadline, (root / "head.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"address": address, "token": token, "root": root}
    process.terminate()  # `ray start --block` stops the processes it started
    try:
        process.wait(timeout=30)
    finally:
        try:  # and whatever of its group outlived it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@pytest.fixture
def client_env(ray_head, monkeypatch):
    """The client side: the head's token where Ray looks for it, and no RAY_AUTH_MODE."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head["token"]))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(Path(__file__).parent.parent)  # submit from the checkout, as the README shows
    return ray_head["address"]


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
