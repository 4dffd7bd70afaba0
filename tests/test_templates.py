"""cluster/templates: the `ray up` configs pass Ray's own cluster schema, the KubeRay RayJob's
entrypoint is a real raylaunch command on a valid config, and all of them keep token auth on."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from launcher.cli import _parser
from launcher.config import validate

TEMPLATES = Path(__file__).parent.parent / "cluster" / "templates"
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def _ray_start_args(command: str) -> list[str] | None:
    """The arguments of the `ray start` in a shell command line, if it has one."""
    for part in command.split(";"):
        words = shlex.split(part.replace("$RAY_HEAD_IP", "10.0.0.1"))
        if words[:2] == ["ray", "start"]:
            return words[2:]
    return None


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_ray_up_template_is_a_valid_gpu_cluster_with_token_auth(name):
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.scripts.scripts import start

    raw = yaml.safe_load((TEMPLATES / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's schema, with its provider's defaults merged
    assert raw["provider"]["type"] == name.split("-")[0]
    assert raw["docker"]["image"] == IMAGE  # the Ray the client has, with the Python it runs
    types = raw["available_node_types"]
    gpu = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu and all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu.values())
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    # raylaunch's dependencies come from the checkout's pyproject.toml, the client's token goes to every node.
    assert raw["file_mounts"]["/home/ray/raylaunch"] == "."
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install" in c and "/home/ray/raylaunch" in c for c in raw["setup_commands"])
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        starts = [c for c in raw[key] if _ray_start_args(c) is not None]
        assert len(starts) == 1 and "export RAY_AUTH_MODE=token;" in starts[0]
        params = start.make_context("start", _ray_start_args(starts[0])).params  # real `ray start` flags
        assert params["head"] is head
        if head:
            assert params["dashboard_host"] == "0.0.0.0" and params["port"] == 6379
        else:
            assert params["address"] == "10.0.0.1:6379"
    # Every host mounts the same NFS file system into its container: the storage every node sees.
    assert any(re.match(r"sudo mount -t nfs4? .* /mnt/shared\b", c) for c in raw["initialization_commands"])
    assert "--volume=/mnt/shared:/mnt/shared" in raw["docker"]["run_options"]
    # The usage at the top submits with a real raylaunch command, writing the run there.
    usage = re.search(r"#\s+(raylaunch submit .*?)\n#\s+ray down", (TEMPLATES / name).read_text(), re.S).group(1)
    args = _parser().parse_args(shlex.split(usage.replace("\\\n#", " "))[1:])
    assert args.command == "submit" and args.address == "http://127.0.0.1:8265"
    assert (TEMPLATES.parent.parent / args.config).is_file()
    assert "output.dir=/mnt/shared/runs/quickstart" in args.overrides


def test_kuberay_rayjob_runs_a_real_command_on_a_valid_config():
    claim, config_map, job = yaml.safe_load_all((TEMPLATES / "kuberay-rayjob.yaml").read_text())
    assert (claim["kind"], config_map["kind"], job["apiVersion"], job["kind"]) == (
        "PersistentVolumeClaim", "ConfigMap", "ray.io/v1", "RayJob")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one volume, mounted by every pod
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    assert spec["shutdownAfterJobFinishes"] is True

    words = shlex.split(spec["entrypoint"])
    assert words[0] == "raylaunch"  # the console script pyproject.toml installs in the image
    args = _parser().parse_args(words[1:])
    assert args.command == "run"
    # The config it runs is the ConfigMap, mounted on the head where the driver runs.
    head = cluster["headGroupSpec"]["template"]["spec"]
    mount = next(m for c in head["containers"] for m in c["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in head["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    key = Path(args.config).relative_to(mount["mountPath"]).as_posix()
    cfg = validate(yaml.safe_load(config_map["data"][key]))
    assert cfg.train.use_gpu
    # The run directory is on the claim, mounted at the same path in the head and every worker.
    pods = [head, *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"])
        mounted = next(m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"])
        assert Path(cfg.output.dir).is_relative_to(mounted["mountPath"])

    gpus = sum(group["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
               for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"])
    assert gpus >= cfg.train.workers
    images = {c["image"] for c in head["containers"]}
    images |= {c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1  # head and workers run the same build


def test_dockerfile_installs_every_package_on_rays_image():
    import tomllib

    text = (TEMPLATES / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == IMAGE
    packages = tomllib.loads((TEMPLATES.parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY \S+ (\w+) /home/ray/raylaunch/\1$", text, re.M))
    assert copied >= {p.rstrip("*") for p in packages}
    assert "pip install --no-cache-dir /home/ray/raylaunch" in text
