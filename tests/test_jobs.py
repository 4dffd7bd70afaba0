"""`raylaunch submit | status | logs | stop` against a real Ray head this module starts (token auth
on), and the pure pieces (token lookup, addresses, runtime env, exit codes) without one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from cluster.jobs import JobError, dashboard_address, exit_code, find_token, last_lines, runtime_env
from cluster.session import free_port
from launcher.cli import main
from launcher.config import ConfigError, load
from launcher.jobs import check_submittable, raylaunch_modules

ROOT = Path(__file__).parent.parent


# ---------------------------------------------------------------------------------------------
# Without a cluster


def test_token_is_found_where_ray_looks_in_its_order(tmp_path):
    home_file = tmp_path / ".ray" / "auth_token"
    home_file.parent.mkdir()
    home_file.write_text("from-home\n")
    other = tmp_path / "other"
    other.write_text("from-path")
    assert find_token({}, home=tmp_path) == ("from-home", str(home_file))
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(other)}, home=tmp_path) == ("from-path", str(other))
    assert find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(other)}, home=tmp_path)[0] == "from-env"
    token, where = find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    assert token is None and "RAY_AUTH_TOKEN" in where and str(tmp_path / "missing") in where


def test_dashboard_address_is_normalized_or_refused():
    assert dashboard_address("10.0.0.5:8265", {}) == "http://10.0.0.5:8265"
    assert dashboard_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert dashboard_address(None, {"RAY_API_SERVER_ADDRESS": "https://head"}) == "https://head"
    with pytest.raises(JobError, match="--address: required"):
        dashboard_address(None, {"RAY_ADDRESS": "auto"})
    with pytest.raises(JobError, match="not a ray:// or GCS address"):
        dashboard_address("ray://head:10001", {})


def test_runtime_env_carries_code_config_and_python(tmp_path):
    env = runtime_env(tmp_path, [], ["pandas==2.2.3"], None, ["data/raw"], {"A": "1"})
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["pandas==2.2.3"] and env["env_vars"] == {"A": "1"}
    assert {".venv", ".git", "runs", ".cache", "data/raw"} <= set(env["excludes"]) and "py_modules" not in env
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pandas\n")
    env = runtime_env(tmp_path, [ROOT / "launcher"], str(requirements), None, [], {})
    assert env["pip"] == str(requirements) and env["py_modules"] == [str(ROOT / "launcher")]
    assert runtime_env(tmp_path, [], None, "rayproject/ray:2.60.0-py311", [], {})["image_uri"].startswith("rayproject/")
    # From the checkout, the packages travel inside the working directory; from elsewhere, beside it.
    assert raylaunch_modules(ROOT) == []
    assert sorted(m.name for m in raylaunch_modules(tmp_path)) == ["cluster", "dataprep", "launcher", "runconfig", "trainers",
                                                                   "tuning"]


def test_config_refuses_what_cannot_run_as_a_job(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.job: pip and image_uri: give one"):
        load(ROOT / "configs" / "quickstart.yaml", ["cluster.job.pip=[torch]", "cluster.job.image_uri=img:1"])
    cfg = load(ROOT / "configs" / "quickstart.yaml")
    with pytest.raises(ConfigError, match=r"^output.dir: 'runs/quickstart' is relative"):
        check_submittable(cfg)
    cfg.output.dir = str(tmp_path / "run")
    check_submittable(cfg)
    cfg.output.dir = "s3://bucket/runs/q"  # opened by the job, with the cluster's credentials
    check_submittable(cfg)


def test_exit_code_follows_the_job_and_last_lines_skip_ray_chatter():
    from ray.job_submission import JobInfo, JobStatus

    def info(status, code=None):
        return JobInfo(status=status, entrypoint="x", driver_exit_code=code)

    assert [exit_code(info(JobStatus.SUCCEEDED, 0)), exit_code(info(JobStatus.FAILED, 2)),
            exit_code(info(JobStatus.FAILED)), exit_code(info(JobStatus.STOPPED))] == [0, 2, 1, 3]
    logs = ("2026-11-29 17:48:38,461\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
            "Running entrypoint for job j: python -m launcher run c.yaml\n\ndata.source: no such file\n")
    assert last_lines(logs) == ["data.source: no such file"]


def test_unreachable_address_is_one_line_within_seconds(capsys):
    port = free_port()  # a port nobody listens on
    started = time.monotonic()
    assert main(["status", "raysubmit_x", "--address", f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"--address http://127.0.0.1:{port}: cannot connect") and "\n" not in err


def test_submit_checks_its_stages_and_refuses_a_redacted_secret_before_connecting(tmp_path, capsys):
    config = _tiny_config(tmp_path, cluster={"job": {"env_vars": {"HF_TOKEN": "***", "MODE": "x"}}})
    assert main(["submit", config, "--stages", "train,preprocess,trian", "--address", "http://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "--stages: unknown stage 'trian' (stages: preprocess, train, tune, distill, quantize, evaluate)",
        "--stages: must start with preprocess (continuing an existing run directory is not supported yet)",
        "--stages: train needs preprocess before it",
        "--stages: stages run in the order preprocess, train, tune, distill, quantize, evaluate",
        "cluster.job.env_vars.HF_TOKEN: *** is a redacted value (raylaunch writes secrets so); give the real one"]


def test_a_token_about_to_cross_a_network_in_the_clear_is_warned_about(monkeypatch, capsys):
    import socket

    from cluster.jobs import plain_http_risk

    for safe in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://head.example:8265"):
        assert plain_http_risk(safe) is None, safe
    assert plain_http_risk("http://10.0.0.5:8265").startswith(
        "warning: sending the cluster's auth token to http://10.0.0.5:8265 over plain http: anyone who can see")
    # This machine's own non-loopback address, on a port nobody listens on: the warning comes before
    # the token is sent (and the connection is refused at once).
    host = next(ip for ip in socket.gethostbyname_ex(socket.gethostname())[2] + ["192.0.2.1"] if not ip.startswith("127."))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token")
    address = f"http://{host}:{free_port()}"
    assert main(["status", "raysubmit_x", "--address", address]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == plain_http_risk(address) and lines[1].startswith(f"--address {address}: ")


# ---------------------------------------------------------------------------------------------
# Against a real head (conftest's ray_head; the quickstart's submission is in test_pipeline_e2e)


def _tiny_config(tmp_path: Path, **sections) -> str:
    raw = {"data": {"source": "sklearn:digits"}, "model": {"type": "mlp", "width": 8, "depth": 1},
           "train": {"workers": 1, "epochs": 1, "zero": {"stage": 0}}, "distill": {"enabled": False},
           "quantize": {"enabled": False}, "output": {"dir": str(tmp_path / "run")}} | sections
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_missing_or_wrong_token_is_one_line_within_seconds(client_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    started = time.monotonic()
    assert main(["submit", _tiny_config(tmp_path), "--address", client_env]) == 2
    err = capsys.readouterr().err.strip()
    assert "requires an auth token and none was found" in err and str(tmp_path / "no-token") in err and "\n" not in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["status", "raysubmit_x", "--address", client_env]) == 2
    assert "refused the auth token from $RAY_AUTH_TOKEN" in capsys.readouterr().err
    assert time.monotonic() - started < 10


def test_a_failing_run_exits_non_zero_with_its_error(client_env, tmp_path, capsys):
    config = _tiny_config(tmp_path, data={"source": str(tmp_path / "missing.csv"), "label_column": "y"})
    assert main(["submit", config, "--address", client_env]) == 2  # the job's own exit code: bad input
    out, err = capsys.readouterr()
    job_id = out.split()[1]
    assert job_id.startswith("raylaunch-job-")
    assert f"job {job_id} failed (exit 2)" in err
    assert f"data.source: no such file or folder '{tmp_path / 'missing.csv'}'" in err.splitlines()[-1]
    assert not (ROOT / ".raylaunch").exists()  # the staged config went with the upload
    assert main(["logs", job_id, "--address", client_env]) == 0
    assert "no such file or folder" in capsys.readouterr().out
    assert main(["status", "raylaunch-no-such-job", "--address", client_env]) == 2
    assert capsys.readouterr().err.strip() == f"raylaunch-no-such-job: no such job on {client_env}"


def test_a_running_job_is_stopped_and_leaves_its_summary(client_env, tmp_path, capsys):
    """Also: the job's secrets are in its environment and nowhere else; its entrypoint is quoted."""
    import shlex

    from ray.job_submission import JobSubmissionClient

    from cluster.jobs import find_token

    run_dir = tmp_path / "run"
    secret = "hf_s3cr3t-value"
    config = _tiny_config(tmp_path, train={"workers": 1, "epochs": 500, "zero": {"stage": 0}},
                          cluster={"job": {"env_vars": {"HF_TOKEN": secret}}}, output={"dir": str(run_dir), "mlflow": True})
    assert main(["submit", config, "--address", client_env, "--no-wait", "--stages", "preprocess, train"]) == 0
    job_id = capsys.readouterr().out.split()[1]
    client = JobSubmissionClient(client_env, headers={"Authorization": f"Bearer {find_token()[0]}"})
    info = client.get_job_info(job_id)
    assert info.runtime_env["env_vars"]["HF_TOKEN"] == secret
    args = shlex.split(info.entrypoint)
    assert args[:4] == ["python", "-m", "launcher", "run"] and args[-2:] == ["--stages", "preprocess,train"]
    assert secret not in info.entrypoint
    deadline = time.monotonic() + 120
    while not (run_dir / "summary.json").exists():  # written once preprocessing is done: training now
        assert time.monotonic() < deadline, "the job never got to training"
        time.sleep(0.5)
    assert main(["stop", job_id, "--address", client_env]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: STOPPED"
    assert main(["status", job_id, "--address", client_env]) == 0
    assert f"{job_id}: STOPPED" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] == "train"
    assert summary["error"] == "stopped by SIGTERM" and "preprocess" in summary["stages"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cluster"]["job"]["env_vars"] == {"HF_TOKEN": "***"}
    leaked = [str(p) for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []  # not in config.yaml, MLflow's params (mlflow.db), the report or any checkpoint
