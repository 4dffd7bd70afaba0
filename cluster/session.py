"""Start or join Ray for one run, quietly unless asked not to be."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from cluster.raycompat import (EMBEDDED_SYSTEM_CONFIG, TRAIN_POLL_ENV, drop_driver_error_messages, embedded_worker_env,
                               quiet_libraries)

# Loggers that print progress chatter on the driver during normal operation.
_CHATTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "torchao", "torch", "mlflow",
                   "alembic", "transformers")


def quiet_driver_logs(verbose: bool) -> None:
    """Keep Ray's, DeepSpeed's and torchao's internal logs off the console unless `verbose`.
    Their errors too: a failure reaches the user as raylaunch's own line (a bad row in a Ray Data
    task was otherwise preceded by some 130 lines of Ray Data's ERROR logs and tracebacks)."""
    level = logging.INFO if verbose else logging.CRITICAL
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # torch's logging configures this child logger itself; the parent's level does not reach it.
    logging.getLogger("torch.utils._pytree").setLevel(level)
    if not verbose:
        quiet_libraries()
        # transformers' weight-loading progress bars and its warnings, which it sets up from these
        # when it is imported (over any logger level set before)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextmanager
def ray_session(address: str | None, num_cpus: int | None, verbose: bool) -> Iterator[dict]:
    """Join the Ray cluster at `address` (or the one `ray job submit` runs us in), or start an
    embedded local one. Yields the cluster's total resources. Shuts Ray down only if this call
    started the connection; a caller's existing `ray.init()` (tests, notebooks) is left alone."""
    quiet_driver_logs(verbose)
    started_here = not ray.is_initialized()
    if started_here:
        if address is not None or "RAY_ADDRESS" in os.environ:
            options = {"address": address, "runtime_env": worker_env(address or os.environ.get("RAY_ADDRESS"), None)}
        else:
            options = embedded_ray_options() | {"num_cpus": num_cpus}
        ray.init(**options, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
        if not verbose:
            drop_driver_error_messages()
    _quiet_ray_data(verbose)
    previous = None
    if started_here and threading.current_thread() is threading.main_thread():
        # ray.init's own handler exits with SystemExit (code 15 or 1, by where the signal lands);
        # `raylaunch stop` / `ray job stop` should end the run like Ctrl-C, summary written.
        previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        yield ray.cluster_resources()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if started_here:
            ray.shutdown()


_received: list[str] = []


def _stopped(signum, frame):
    _received.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def stop_signal() -> str | None:
    """The signal that stopped this driver, if one did: Ray re-raises a KeyboardInterrupt of its own
    on its way out of a run, so the exception itself no longer says."""
    return _received[-1] if _received else None


def embedded_ray_options(**env_vars: str) -> dict:
    """The `ray.init` arguments every embedded Ray starts with (`ray_session` when it joins no
    cluster; the test suite's cluster and bench/gpu_throughput.py, which add their own resources):
    a dashboard on a free port, the workers' runtime_env (`worker_env`, plus `env_vars`) and
    EMBEDDED_SYSTEM_CONFIG.

    The dashboard stays: Ray Train v2's placement-group cleaner queries the state API it serves;
    without it, a Tune trial's worker group is never released and the next trial waits forever for
    its CPUs."""
    port = free_port()
    runtime_env = worker_env(None, port)
    runtime_env["env_vars"] |= env_vars
    # A copy: ray.init adds its own keys to the dict it is given.
    return {"dashboard_port": port, "runtime_env": runtime_env, "_system_config": dict(EMBEDDED_SYSTEM_CONFIG)}


def worker_env(address: str | None, dashboard_port: int | None) -> dict:
    """The runtime_env of this job's worker processes: Ray Train's poll interval where the user set
    one (`TRAIN_POLL_ENV`: every run then uses it), and which cluster they are in (for an embedded
    Ray, its dashboard: cluster.raycompat, 8)."""
    env = {TRAIN_POLL_ENV: os.environ[TRAIN_POLL_ENV]} if TRAIN_POLL_ENV in os.environ else {}
    if dashboard_port is not None:
        env |= embedded_worker_env(dashboard_port)
    elif address and "://" not in address and address != "auto":
        env["RAY_ADDRESS"] = address
    return {"env_vars": env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_ray_data(verbose: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    quiet_driver_logs(verbose)  # ray.init reconfigures the "ray" logger; set the levels again
