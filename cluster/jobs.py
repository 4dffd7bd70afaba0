"""Ray jobs on a running cluster: connecting with the cluster's auth token, the runtime environment
that carries the code and the config, and following a job to its end.

The token is found the way Ray finds it (RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then
~/.ray/auth_token) and sent as a bearer header, so the client needs no RAY_AUTH_MODE of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import requests

TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Left out of the uploaded working directory: environments, run outputs, caches, VCS data.
# Ray refuses a working_dir package over its size limit, and none of these belong on the cluster.
DEFAULT_EXCLUDES = (".venv", "venv", ".git", "runs", ".cache", "__pycache__", "*.egg-info", ".pytest_cache",
                    ".ipynb_checkpoints")
# Exit codes of `raylaunch submit` for a job that did not succeed and did not say its own.
EXIT_FAILED, EXIT_STOPPED = 1, 3


class JobError(Exception):
    """A problem talking to the cluster or with a job, said in one line."""


def find_token(environ: dict | None = None, home: Path | None = None) -> tuple[str | None, str]:
    """The cluster auth token and where it came from; (None, where it was looked for) when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if environ.get(TOKEN_PATH_ENV):
        path = Path(environ[TOKEN_PATH_ENV]).expanduser()
        looked = f"${TOKEN_PATH_ENV} ({path})"
    else:
        path = (home / ".ray" / "auth_token") if home else DEFAULT_TOKEN_FILE.expanduser()
        looked = str(path)
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    return (token, str(path)) if token else (None, f"${TOKEN_ENV}, {looked}")


def dashboard_address(address: str | None, environ: dict | None = None) -> str:
    """The job server's HTTP address: `--address`, else $RAY_API_SERVER_ADDRESS or an http $RAY_ADDRESS
    (what `ray job submit` reads), with http:// added to a bare host:port."""
    environ = os.environ if environ is None else environ
    address = address or environ.get("RAY_API_SERVER_ADDRESS")
    if not address and environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = environ["RAY_ADDRESS"]
    if not address:
        raise JobError("--address: required: the cluster's dashboard, e.g. http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address {address}: jobs are submitted over HTTP to the dashboard, e.g. http://HEAD:8265 "
                       f"(not a ray:// or GCS address)")
    return address.rstrip("/")


def connect(address: str, timeout_s: float = 5.0, warn: Callable[[str], None] | None = None):
    """A JobSubmissionClient for the dashboard at `address`, after checking within `timeout_s` that
    it answers and accepts our token: an unreachable address or a refused token is one line, not a
    hang. `warn` hears, before anything is sent, that the token is about to cross a network unencrypted."""
    token, where = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    risk = plain_http_risk(address) if token else None
    if risk and warn:
        warn(risk)
    try:
        response = requests.get(f"{address}/api/version", headers=headers, timeout=timeout_s)
    except requests.Timeout:
        raise JobError(f"--address {address}: no answer within {timeout_s:g} s; check the host and the dashboard "
                       f"port (8265 by default) and that the cluster is up") from None
    except requests.RequestException as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
        raise JobError(f"--address {address}: cannot connect ({reason}); check the host and the dashboard port "
                       f"(8265 by default) and that the cluster is up") from None
    if response.status_code == 401:
        raise JobError(f"--address {address}: the cluster requires an auth token and none was found (looked in "
                       f"{where}); copy the head's token there (`ray get-auth-token` on the head) or set {TOKEN_ENV}")
    if response.status_code == 403:
        raise JobError(f"--address {address}: the cluster refused the auth token from {where}; use this cluster's token "
                       f"(`ray get-auth-token` on its head)")
    if response.status_code != 200 or "ray_version" not in response.text:
        raise JobError(f"--address {address}: not a Ray dashboard (HTTP {response.status_code} from /api/version)")
    from ray.job_submission import JobSubmissionClient

    # Both set their own level to INFO at import (upload and websocket chatter); follow "ray"'s.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.getLogger("ray").getEffectiveLevel())
    return JobSubmissionClient(address, headers=headers)


def plain_http_risk(address: str) -> str | None:
    """Why sending the cluster's auth token to `address` exposes it: plain http:// to a host that is
    not this machine (anyone on the path can read the token and then run code on the cluster)."""
    from urllib.parse import urlparse

    parsed = urlparse(address)
    if parsed.scheme != "http" or _loopback(parsed.hostname or ""):
        return None
    return (f"warning: sending the cluster's auth token to {address} over plain http: anyone who can see the traffic "
            f"can read it and run code on the cluster; reach the dashboard over https, an SSH tunnel "
            f"(ssh -L 8265:localhost:8265 HEAD, then --address http://127.0.0.1:8265) or a private network")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def runtime_env(working_dir: Path, modules: list[Path], pip: list[str] | str | None, image_uri: str | None,
                excludes: list[str], env_vars: dict[str, str]) -> dict:
    """The runtime_env of a submitted run: the working directory (with the config staged in it),
    the raylaunch packages when they live outside it, and the Python the job runs in."""
    env: dict = {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *excludes]}
    if modules:
        env["py_modules"] = [str(m) for m in modules]
    if pip:
        env["pip"] = pip if isinstance(pip, list) else str(Path(pip).resolve())
    if image_uri:
        env["image_uri"] = image_uri
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def job_info(client, job_id: str):
    """The JobInfo of `job_id`, or one line saying there is no such job."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise JobError(f"{job_id}: no such job on {client.get_address()}") from None
        raise


def follow_logs(client, job_id: str, write: Callable[[str], None]) -> None:
    """Write the job's logs as they come until it ends (the server closes the stream then)."""

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def wait(client, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5):
    """The job's JobInfo once it has ended (or when `timeout_s` has passed)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(client, job_id)
        if info.status.value in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)


def exit_code(info) -> int:
    """`raylaunch submit`'s exit code for an ended job: 0 succeeded; a failed job's own exit code
    (raylaunch run: 1 the run failed, 2 bad config or input), 1 if it had none; 3 stopped."""
    status = info.status.value
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    return info.driver_exit_code or EXIT_FAILED


# Lines Ray's job manager adds to a job's logs: not the job's own words.
_JOB_MANAGER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|DEBUG)\b|Running entrypoint for job )")


def last_lines(logs: str, limit: int = 6) -> list[str]:
    """The job's own last non-empty lines: where `raylaunch run` says why it failed."""
    return [line.rstrip() for line in logs.splitlines() if line.strip() and not _JOB_MANAGER_LINE.match(line)][-limit:]
