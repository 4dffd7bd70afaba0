"""The pipeline, in the order it runs: preprocess -> train or tune -> distill -> quantize -> evaluate -> report.

Each stage is a function of launcher/stages.py that calls the package owning the work and returns
a typed result holding what the summary keeps. The run directory holds everything a run produces:

    config.yaml          the resolved config
    data.json            where the preprocessed splits are: the cache entry (see dataprep.cache)
    ray/                 Ray Train / Tune storage: every run's checkpoints
    models/teacher/      model.safetensors + model.json (+ tokenizer.json for a BPE language model)
    models/student/      the same
    models/student-<method>/  each quantized model: its quantized tensors + model.json (trainers.modeldir;
                         static_int8 also model.pt2, its program compiled for this machine's CPU)
    summary.json         status, per-stage results, per-model numbers
    report.md            the same as tables

With `output.dir` a URI (cluster.remote), Ray writes ray/ there itself; the rest is written to a
local staging folder and copied up after every stage and at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from rich.console import Console

from cluster.remote import download, is_uri, join, read_text, staging_dir
from cluster.resources import describe, missing_resources, worker_group_demand
from cluster.session import ray_session
from launcher.config import ConfigError, dump_yaml
from launcher.errors import failure_line
from launcher.live import Live
from launcher.report import stage_line, write_report, write_summary
from launcher.rundir import MANIFEST, Run, cache_root, claim, discard
from launcher.stages import RESTORED, Models, distill, evaluate, preprocess, quantize, train, tune
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig


def run_pipeline(cfg: RunConfig, stages: list[str], console: Console, verbose: bool = False,
                 resume: bool = False) -> dict:
    """Run `stages` for a validated config; returns the summary also written to summary.json.
    With `resume`, the run directory's finished stages are kept and the unfinished one continues
    from its last checkpoint (Ray Train and Tune find theirs under the same names)."""
    summary = {"status": "running", "stages": {}, "models": {}, "timeline": {"start": time.time()}}
    with ray_session(cfg.cluster.address, cfg.cluster.num_cpus, verbose) as resources, \
            _opened(cfg, stages, console, resources, summary, verbose, resume) as stage:
        data = stage("preprocess", preprocess)
        models = Models() + stage("train", train, data)
        models += stage("tune", tune, data, models.teacher)  # the teacher, or distilling it (distill paths searched)
        models += stage("distill", distill, data, models.teacher)
        quantized = stage("quantize", quantize, data, models.final)
        stage("evaluate", evaluate, data, models, quantized)
    return summary


class _Stages:
    """Takes a stage when `stages` has it (None otherwise): kept where the interrupted run this one
    resumes finished it, else run, its line printed, and the summary written (what a resume starts
    from) and copied up to a URI run's URI."""

    def __init__(self, run: Run, stages: list[str], finished: dict):
        self.run, self.stages, self.finished = run, stages, finished
        self.current: str | None = None
        """The stage running (the one a failure is recorded against)."""

    def __call__(self, name: str, function: Callable, *inputs):
        if name not in self.stages:
            return None
        self.current, run = name, self.run
        if name in self.finished:
            result = self.finished[name]
            run.summary["stages"][name] = result.record
            _add_models(run.summary, result.models_record())
            run.console.print(f"[dim]↷ {name:<10} finished before; kept[/]")
            return result
        run.summary["timeline"][f"{name}_start"] = time.time()
        started = time.perf_counter()
        with run.live.stage(name):
            try:
                result = function(run, *inputs)
            except BaseException as exc:
                from trainers.quantize import QuantizationRejected

                if isinstance(exc, QuantizationRejected):  # kept in models/: the summary says which and why
                    _add_models(run.summary, exc.models)
                run.console.print(f"[red]✗ {name:<10}[/] failed after {time.perf_counter() - started:.0f} s")
                raise
        record = run.summary["stages"][name] = {**result.record, "seconds": round(time.perf_counter() - started, 1)}
        _add_models(run.summary, result.models_record())
        # One line however narrow the console (a log file is 80 columns): what grep and a reader expect.
        run.console.print(f"[green]✓ {name:<10}[/] {stage_line(name, record, run.summary, run.cfg)}  "
                          f"[dim]({record['seconds']:.0f} s)[/]", soft_wrap=True)
        write_summary(run.run_dir, run.summary)
        run.sync()
        return result


def _add_models(summary: dict, models: dict) -> None:
    """A stage's numbers for the models it made or measured, in its order: evaluation measures every
    model (the fp32 ones first), and its entries replace what quantization recorded of them."""
    summary["models"] = models | {name: m for name, m in summary["models"].items() if name not in models}


@contextmanager
def _opened(cfg: RunConfig, stages: list[str], console: Console, resources: dict, summary: dict, verbose: bool,
            resume: bool):
    """The run, from the checks that need the cluster to its record: refused before anything is
    written; on the way out summary.json and the reports written (and copied up), or, where no stage
    finished and nothing can be resumed, everything it wrote removed: the corrected command runs into
    the same output.dir. Yields the stage runner."""
    remote = cfg.output.dir if is_uri(cfg.output.dir) else None
    run_dir = staging_dir(remote) if remote else Path(cfg.output.dir).resolve()
    summary["timeline"]["ray_ready"] = time.time()
    _check_shared_storage(cfg, run_dir, remote)
    _check_worker_group_fits(cfg, resources, sweep="tune" in stages)
    training = any(s in stages for s in ("train", "tune", "distill"))
    # Read only where it decides something: a resumed run's `auto` keeps the stage it trained with.
    saved_stage = _saved_zero_stage(remote or str(run_dir)) if resume and cfg.train.zero.stage == "auto" else None
    resolved = _resolve(cfg, resources, summary, console, training, saved_stage)
    created = _open_run_dir(run_dir, remote, resume, dump_yaml(resolved.run))
    finished, reads_before = _interrupted(run_dir) if resume else ({}, {})
    try:
        live = Live(run_dir, console, resolved.run.output.tensorboard, resolved.run.output.mlflow, resolved.dump(),
                    verbose, name=remote.rstrip("/").rsplit("/", 1)[-1] if remote else None)
    except BaseException:
        if not resume:
            discard(run_dir, remote, created)
        raise
    run = Run(resolved, run_dir, remote, console, live, resources, summary, resume, reads_before)
    stage = _Stages(run, stages, finished)
    kept = True
    try:
        yield stage
        summary["status"] = "succeeded"
    except BaseException as exc:
        summary.update(status="failed", failed_stage=stage.current, error=failure_line(exc))
        kept = resume or bool(summary["stages"])
        raise
    finally:
        if kept:
            _write_record(run)
        else:
            live.finish(summary, [])  # an MLflow server's run is ended, marked failed
        live.close()
        if not kept:
            discard(run_dir, remote, created)


def _open_run_dir(run_dir: Path, remote: str | None, resume: bool, config_text: str) -> bool:
    """Make the run directory ready: a new run claims it (its manifest, written only where none is)
    and writes its config; a resumed one is copied down from its URI. Returns whether this run
    created the (local) folder."""
    created = not run_dir.exists()
    if resume:
        if remote:  # the staging folder starts as the URI holds the run: all but ray/
            download(remote, run_dir)
        # What the run goes on with: the same config but for what a resume may change (the worker count).
        (run_dir / "config.yaml").write_text(config_text)
        return False
    refused = claim(remote or str(run_dir))
    if refused:
        raise ConfigError([refused])
    if remote:  # the URI was empty: so is its staging folder (another run's leftovers go)
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if remote:
        (run_dir / MANIFEST).write_text(read_text(join(remote, MANIFEST)))
    (run_dir / "config.yaml").write_text(config_text)
    return created


def _interrupted(run_dir: Path) -> tuple[dict, dict]:
    """What the interrupted run this one resumes left: the stages it finished whose models are
    still there (as their typed results), and how each training stage read its splits."""
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    finished = {}
    for name, record in summary.get("stages", {}).items():
        result = RESTORED[name].restored(run_dir, name, record) if name in RESTORED else None
        if result is not None and all(p.exists() for p in result.dirs().values()):
            finished[name] = result
    return finished, summary.get("data_in_memory", {})


def _write_record(run: Run) -> None:
    """summary.json and the reports (and to MLflow), copied up to a URI run's URI."""
    write_summary(run.run_dir, run.summary)
    files = write_report(run.run_dir, run.summary)
    run.live.finish(run.summary, [run.run_dir / "summary.json", *files])
    try:
        run.sync()
    except Exception as exc:  # pyarrow raises OSError or ArrowInvalid; the run's own error must not be lost
        run.console.print(f"[red]could not copy the run up to {run.remote}[/]: {' '.join(str(exc).split())[:300]}; "
                          f"everything but ray/ is in {run.run_dir}", highlight=False)
        if run.summary["status"] == "succeeded":
            raise


def _check_shared_storage(cfg: RunConfig, run_dir: Path, remote: str | None) -> None:
    """On a multi-node cluster, refuse a run directory or data cache that some node cannot see."""
    from cluster.storage import nodes_missing

    default = "~/.cache/raylaunch/data" if remote else "beside output.dir"
    cache = "data.cache_dir" if cfg.data.cache_dir else f"data.cache_dir (default: {default})"
    # A URI output.dir is storage every node reaches; the data cache is still a folder.
    data = cache_root(cfg, run_dir, remote)
    folders = {cache: data} if remote else {"output.dir": run_dir, cache: data}
    count, missing = nodes_missing(folders)
    problems = [f"{name}: {folders[name]} is not on storage every node sees: {', '.join(nodes)} of this "
                f"{count}-node cluster do not see a file written there (a disk of "
                f"this machine only); checkpoints, the data cache and models must be on a filesystem mounted at the same "
                f"path on every node (NFS, EFS, Filestore, a Kubernetes ReadWriteMany volume)"
                for name, nodes in missing.items() if nodes]
    if problems:
        raise ConfigError(problems)


def _check_worker_group_fits(cfg: RunConfig, resources: dict, sweep: bool) -> None:
    """Refuse a worker group the cluster can never hold (the configured one, or the largest a
    sweep's trial can sample), instead of waiting for it forever."""
    if sweep:
        from tuning.packing import packing_problems

        problems = packing_problems(cfg, resources)
        if problems:
            raise ConfigError(problems)
    fewest = cfg.train.worker_range[0]  # an elastic group starts with as many as fit, at least its min
    demand = worker_group_demand(fewest, cfg.train.cpus_per_worker, cfg.train.use_gpu)
    missing = missing_resources(resources, demand)
    if missing:
        raise ConfigError([
            f"train.workers: {fewest} workers need {describe(demand)} but the Ray cluster has "
            f"{describe({k: resources.get(k, 0.0) for k in demand})} (short by {describe(missing)}); "
            f"lower train.workers or train.cpus_per_worker, or add nodes"
        ])


def _resolve(cfg: RunConfig, resources: dict, summary: dict, console: Console, training: bool,
             saved_stage: int | None) -> ResolvedConfig:
    """The config this run uses, resolved once: `zero.stage: auto` planned against the cluster (a
    model no stage can hold is refused where it would train; a resumed run keeps `saved_stage`, the
    stage it trained with), the user's DeepSpeed JSON read here (trials and workers may run where it is not)."""
    from launcher.plan import check_plan, make_plan

    stage = None
    if cfg.train.zero.stage == "auto" and saved_stage is not None:  # its checkpoints are that stage's
        stage = saved_stage
        console.print(f"  zero.stage auto -> {stage}, as the interrupted run resolved it")
    if training or (cfg.train.zero.stage == "auto" and stage is None):
        plan = make_plan(cfg, resources)
        summary["plan"] = plan.summary()
        if training:
            chosen = check_plan(plan)
        else:  # nothing trains: the stage is only recorded
            chosen = plan.chosen_stage if plan.chosen_stage is not None else 3
        if cfg.train.zero.stage == "auto" and stage is None:
            stage = chosen
            console.print(f"  zero.stage auto -> {stage} ({plan.params:,} parameters, "
                          f"{plan.stages[stage].device_bytes / 2**20:.1f} MiB of model states per worker)")
    user = None
    if cfg.train.deepspeed_config:
        from trainers.deepspeed_config import read_user_config

        user = read_user_config(cfg.train.deepspeed_config)
    resolved = ResolvedConfig.of(cfg, zero_stage=stage, deepspeed_user=user, resources=resources)
    summary["zero_stage"] = resolved.run.train.zero.stage
    return resolved


def _saved_zero_stage(out: str) -> int | None:
    """The ZeRO stage the interrupted run at `out` resolved `auto` to, from its config.yaml (None
    for a run written before config.yaml held the resolved config)."""
    import yaml

    text = read_text(join(out, "config.yaml"))
    stage = (((yaml.safe_load(text) or {}) if text else {}).get("train") or {}).get("zero", {}).get("stage")
    return stage if isinstance(stage, int) else None
