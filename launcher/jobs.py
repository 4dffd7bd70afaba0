"""`raylaunch submit | status | logs | stop`: a run as a Ray job on a running cluster.

`submit` validates the config here, stages the resolved config in the working directory it
uploads (the current directory, as `ray job submit --working-dir .` would), and runs
`python -m launcher run` there as the job's entrypoint; the job joins the cluster it runs in.
"""

from __future__ import annotations

import re
import secrets
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console

from cluster.jobs import (EXIT_STOPPED, connect, dashboard_address, exit_code, follow_logs, job_info,
                          last_lines, runtime_env, wait)
from cluster.remote import is_uri
from launcher.checks import stage_problems
from launcher.config import ConfigError, dump_yaml, load
from runconfig.resolved import REDACTED
from runconfig.schema import RunConfig

PACKAGES = ("launcher", "cluster", "dataprep", "trainers", "tuning", "runconfig")
STAGING = Path(".raylaunch") / "jobs"
"""Where `submit` stages the resolved config inside the uploaded working directory, removed once
uploaded. Ray leaves out what .gitignore names, so this folder must not be ignored."""


def _connect(address: str):
    """The cluster's job client; a warning on stderr first where the token would cross a network in the clear."""
    errors = Console(stderr=True)
    return connect(address, warn=lambda text: errors.print(text, style="yellow", markup=False, highlight=False,
                                                          soft_wrap=True))


def check_submittable(cfg: RunConfig) -> None:
    """What cannot work as a job: an output directory relative to the job's temporary working
    directory. A URI is opened by the job on the cluster, with the cluster's credentials."""
    out = cfg.output.dir
    if is_uri(out):
        return
    if not Path(out).is_absolute():
        raise ConfigError([f"output.dir: {out!r} is relative, so the job would write the run into its temporary working "
                           f"directory on the head, removed with it; give an absolute path on storage the cluster keeps "
                           f"(shared by all nodes for a multi-node cluster)"])


def raylaunch_modules(working_dir: Path) -> list[Path]:
    """raylaunch's packages, to upload beside the working directory when they are not inside it."""
    root = Path(__file__).resolve().parents[1]
    inside = (working_dir / "launcher" / "__init__.py").exists() and (working_dir / "launcher").resolve() == root / "launcher"
    return [] if inside else [root / name for name in PACKAGES]


def submit(config_path: str, overrides: list[str], address: str | None, no_wait: bool, stages: str | None,
           resume: bool, verbose: bool, console: Console, errors: Console) -> int:
    from cluster.session import quiet_driver_logs

    quiet_driver_logs(verbose)  # the job client's packaging and websocket chatter
    cfg = load(config_path, overrides)
    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    problems = stage_problems(stage_list, cfg.sweeps_student) if stage_list is not None else []
    # A config written by raylaunch (config.yaml, tune/best_config.yaml) holds its secrets redacted.
    problems += [f"cluster.job.env_vars.{name}: {REDACTED} is a redacted value (raylaunch writes secrets so); give the "
                 f"real one" for name, value in cfg.cluster.job.env_vars.items() if value == REDACTED]
    if problems:
        raise ConfigError(problems)
    check_submittable(cfg)
    cfg.cluster.address = None  # the job joins the cluster it runs in (RAY_ADDRESS, set by Ray)
    address = dashboard_address(address)
    client = _connect(address)

    working_dir = Path.cwd()
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config_path).stem)[:40] or "config"
    job_id = f"raylaunch-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    staged = STAGING / f"{job_id}.yaml"
    entrypoint = shlex.join(["python", "-m", "launcher", "run", str(staged),
                             *(["--stages", ",".join(stage_list)] if stage_list else []),
                             *(["--resume"] if resume else []), *(["--verbose"] if verbose else [])])
    job = cfg.cluster.job
    # The job's console is a log file: rich wraps it at 80 columns unless told the width to fill.
    env_vars = {"COLUMNS": str(console.width)} | job.env_vars
    env = runtime_env(working_dir, raylaunch_modules(working_dir), job.pip, job.image_uri, job.excludes, env_vars)
    try:
        (working_dir / staged).parent.mkdir(parents=True, exist_ok=True)
        (working_dir / staged).write_text(dump_yaml(cfg))
    except OSError as exc:
        raise ConfigError([f"{working_dir}: cannot stage the config for upload ({exc.strerror}); submit from a writable "
                           f"directory"]) from None
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=env,
                          metadata={"raylaunch_config": str(config_path), "output_dir": cfg.output.dir})
    finally:  # uploaded (or refused): the staged copy has done its work
        (working_dir / staged).unlink(missing_ok=True)
        for folder in ((working_dir / STAGING), (working_dir / STAGING.parent)):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    console.print(f"submitted {job_id} to {address}  [dim](output: {cfg.output.dir})[/]", soft_wrap=True)
    if no_wait:
        console.print(f"  follow: raylaunch logs {job_id} --address {address} --follow\n"
                      f"  stop:   raylaunch stop {job_id} --address {address}", highlight=False)
        return 0
    return _follow_to_end(client, job_id, address, console, errors)


def _follow_to_end(client, job_id: str, address: str, console: Console, errors: Console) -> int:
    try:
        follow_logs(client, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        info = wait(client, job_id)
    except KeyboardInterrupt:
        errors.print(f"stopped following; the job goes on: raylaunch stop {job_id} --address {address}", highlight=False)
        return 130
    return _outcome(client, job_id, info, console, errors)


def _outcome(client, job_id: str, info, console: Console, errors: Console) -> int:
    code = exit_code(info)
    if code == 0:
        console.print(f"[green]job {job_id} succeeded[/]")
        return 0
    if code == EXIT_STOPPED:
        errors.print(f"job {job_id} was stopped", highlight=False)
        return code
    errors.print(f"job {job_id} failed (exit {info.driver_exit_code}); its last lines:", highlight=False)
    for line in last_lines(client.get_job_logs(job_id)) or [info.message or ""]:
        errors.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    return code


def status(job_id: str, address: str | None, console: Console) -> int:
    client = _connect(dashboard_address(address))
    info = job_info(client, job_id)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
    took = f", {(info.end_time - info.start_time) / 1000:.0f} s" if info.end_time and info.start_time else ""
    console.print(f"{job_id}: {info.status.value} (started {started}{took})", highlight=False)
    console.print(f"  entrypoint: {info.entrypoint}", markup=False, highlight=False)
    if info.status.value in ("FAILED", "STOPPED") and info.message:
        console.print(f"  {info.message.splitlines()[0]}", markup=False, highlight=False)
    return 0


def logs(job_id: str, address: str | None, follow: bool, console: Console) -> int:
    client = _connect(dashboard_address(address))
    job_info(client, job_id)  # an unknown id is one line, before any log request
    if follow:
        try:
            follow_logs(client, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        except KeyboardInterrupt:
            return 130
    else:
        sys.stdout.write(client.get_job_logs(job_id))
    return 0


def stop(job_id: str, address: str | None, console: Console) -> int:
    client = _connect(dashboard_address(address))
    info = job_info(client, job_id)
    if info.status.value in ("SUCCEEDED", "FAILED", "STOPPED"):
        console.print(f"{job_id}: already ended ({info.status.value})", highlight=False)
        return 0
    client.stop_job(job_id)
    info = wait(client, job_id, timeout_s=60)
    console.print(f"{job_id}: {info.status.value}", highlight=False)
    return 0 if info.status.value == "STOPPED" else 1

