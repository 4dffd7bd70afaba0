"""One local Ray cluster for the whole suite (2 CPUs, like CI), started lazily by tests that need it,
and a Ray head in processes of its own for the tests that submit jobs to it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parent.parent


def skip_or_fail(reason: str) -> None:
    """Skip a test that cannot run here, saying why; in CI (CI=true), where everything must run, fail it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ray_cluster():
    # The pipeline joins an existing connection and leaves it running (cluster.session.ray_session),
    # so this cluster's workers get told their cluster's address the way ray_session tells its own.
    from cluster.session import embedded_ray_options

    ray.init(num_cpus=2, log_to_driver=False, logging_level="error", **embedded_ray_options())
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    """The session's local Ray, which the CLI processes join (`cluster.address`) instead of each
    starting one of its own."""
    return ray.get_runtime_context().gcs_address


def raylaunch(*args: str, address: str | None = None, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` in a process of its own, as a user runs it (stdout and stderr both
    captured); with `address`, joining that Ray."""
    joined = ["--set", f"cluster.address={address}"] if address else []
    return subprocess.run([sys.executable, "-m", "launcher", *args, *joined], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_ray(root: Path, num_cpus: int, head: dict | None = None, wrap: list[str] = ()) -> dict:
    """`ray start --block` in its own process group (stopped by `stop_ray`): a head when `head` is
    None, else a node joining that head (what start_ray returned for it). Token auth on, with a
    token file in `root` (a joining node uses its head's); ports of its own beside any other Ray on
    this machine. `wrap` is a command the `ray start` runs under (e.g. a mount namespace)."""
    root.mkdir(parents=True, exist_ok=True)
    # Ray's temp dir (sockets in it) under a short path: a Unix socket path has at most 107 bytes.
    temp = tempfile.mkdtemp(prefix="rl-") if head is None else head["temp"]
    token = root / "token" if head is None else head["token"]
    if head is None:
        token.write_text(os.urandom(16).hex())
    gcs, dashboard, agent, agent_grpc, runtime_env_port, metrics, client = _free_ports(7)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                        # SIGTERM at teardown stops it at once (it would drain the node for 30 s)
                        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                        # Its processes' state API queries go to it, not to another Ray on this
                        # machine (see cluster.session.worker_env).
                        "RAY_API_SERVER_ADDRESS": head["address"] if head else f"http://127.0.0.1:{dashboard}",
                        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    role = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--temp-dir={temp}"] if head is None else [f"--address={head['gcs']}"]
    command = [str(BIN / "ray"), "start", "--block", *role, "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env_port}", f"--metrics-export-port={metrics}",
               f"--num-cpus={num_cpus}", "--object-store-memory=400000000", "--disable-usage-stats"]
    log = root / "ray-start.log"
    process = subprocess.Popen([*wrap, *command], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    # `ray start --block` says so once its node is up and registered with the head.
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    return {"process": process, "gcs": f"127.0.0.1:{gcs}", "address": f"http://127.0.0.1:{dashboard}", "token": token,
            "root": root, "temp": temp, "head": head is None}


def stop_ray(started: dict) -> None:
    process = started["process"]
    process.terminate()  # `ray start --block` stops the processes it started
    try:
        process.wait(timeout=30)
    finally:
        try:  # and whatever of its group outlived it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if started["head"]:
            shutil.rmtree(started["temp"], ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on loopback, as `raylaunch submit` finds one on a cluster: token auth on (its token
    in a file of its own, not ~/.ray), 2 CPUs, ports of its own beside the in-process cluster's.
    One per test module: stopped when the module's tests are done, its idle processes do not
    slow the rest of the suite."""
    head = start_ray(tmp_path_factory.mktemp("cluster") / "head", num_cpus=2)
    import requests

    deadline = time.monotonic() + 60  # the dashboard answers a moment after the node is up
    while True:
        try:
            if requests.get(f"{head['address']}/api/version", timeout=2,
                            headers={"Authorization": f"Bearer {head['token'].read_text()}"}).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the head's dashboard did not answer"
        time.sleep(0.5)
    yield head
    stop_ray(head)


@pytest.fixture
def client_env(ray_head, monkeypatch):
    """The client side: the head's token where Ray looks for it, and no RAY_AUTH_MODE."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head["token"]))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(Path(__file__).parent.parent)  # submit from the checkout, as the docs show
    return ray_head["address"]


@pytest.fixture(scope="session")
def digits_data(ray_cluster, tmp_path_factory):
    """The digits dataset preprocessed once for the training tests."""
    from dataprep.cache import prepare
    from runconfig.schema import RunConfig

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
