"""The pipeline, in the order it runs: preprocess -> train or tune -> distill -> quantize -> evaluate -> report.

Each stage is a short function that calls the package owning the work and returns the numbers
the summary keeps. The run directory holds everything a run produces:

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
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cluster.raycompat import CHECKPOINT_SNAPSHOT, latest_checkpoint_metrics, registered_checkpoints
from cluster.remote import RAY_DIR, download, fetch, is_uri, join, read_text, remove_dirs, staging_dir, upload
from cluster.resources import describe, missing_resources, worker_group_demand
from cluster.session import ray_session
from dataprep.meta import DataMeta
from launcher.config import ConfigError, dump_yaml
from launcher.errors import failure_line
from launcher.live import Live
from launcher.report import stage_line, write_report, write_summary
from launcher.rundir import MANIFEST, claim, discard
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig


@dataclass
class Run:
    """What the stages share: the config, where the run lives, and what earlier stages produced."""

    cfg: RunConfig
    """The validated config; once Ray has started, the resolved one's (`resolved.run`)."""
    run_dir: Path
    console: Console
    resources: dict = field(default_factory=dict)
    data_meta: DataMeta | None = None
    models: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=lambda: {"status": "running", "stages": {}, "models": {}})
    resume: bool = False
    data_dir: Path | None = None
    """The cache entry holding the preprocessed splits."""
    test_metrics: dict[str, dict] = field(default_factory=dict)
    """Test-split metrics an earlier stage of this run measured (the quantize gate), by model name."""
    live: Live | None = None
    """Progress bars and the metric logs (TensorBoard, MLflow)."""
    remote: str | None = None
    """output.dir when it is a URI; `run_dir` is then the local staging folder copied up to it."""
    reads_before: dict[str, bool] = field(default_factory=dict)
    """How the interrupted run this one resumes read each training stage's splits (held in memory or not)."""
    resolved: ResolvedConfig | None = None
    finished: dict[str, dict] = field(default_factory=dict)
    """The stages an interrupted run this one resumes finished, with their results."""
    current: str | None = None
    """The stage running (the one a failure is recorded against)."""

    @property
    def cache_root(self) -> Path:
        data = self.cfg.data
        if data.cache_dir:
            return Path(data.cache_dir).resolve()
        return Path.home() / ".cache" / "raylaunch" / "data" if self.remote else self.run_dir.parent / ".cache" / "data"

    @property
    def storage(self) -> Path | str:
        """Ray Train's and Tune's storage_path."""
        return join(self.remote, RAY_DIR) if self.remote else self.run_dir / RAY_DIR

    def shared(self, path: Path) -> str:
        """A file of the run directory where workers on any node can read it: at the URI for a URI
        run (copied up at the end of the stage that wrote it), else the path itself."""
        return join(self.remote, path.relative_to(self.run_dir).as_posix()) if self.remote else str(path)

    def sync(self) -> None:
        """Copy a URI run's staging folder up to its URI."""
        if self.remote:
            upload(self.run_dir, self.remote)


def run_pipeline(cfg: RunConfig, stages: list[str], console: Console, verbose: bool = False,
                 resume: bool = False) -> dict:
    """Run `stages` for a validated config; returns the summary also written to summary.json.
    With `resume`, the run directory's finished stages are kept and the unfinished one continues
    from its last checkpoint (Ray Train and Tune find theirs under the same names)."""
    remote = cfg.output.dir if is_uri(cfg.output.dir) else None
    run = Run(cfg=cfg, run_dir=staging_dir(remote) if remote else Path(cfg.output.dir).resolve(), console=console,
              resume=resume, remote=remote)
    run.summary["timeline"] = {"start": time.time()}
    with ray_session(cfg.cluster.address, cfg.cluster.num_cpus, verbose) as resources, _opened(run, stages, resources, verbose):
        for name in stages:  # preprocess -> train or tune -> distill -> quantize -> evaluate
            _run_stage(run, name)
    return run.summary


def _run_stage(run: Run, name: str) -> None:
    """One stage: kept where an interrupted run finished it, else run, its line printed, and the
    summary written (what a resume starts from) and copied up to a URI run's URI."""
    run.current = name
    if name in run.finished:
        _restore(run, name, run.finished[name])
        return
    with _stage(run, name):
        run.summary["stages"][name] = STAGES[name](run)
    write_summary(run.run_dir, run.summary)
    run.sync()


@contextmanager
def _opened(run: Run, stages: list[str], resources: dict, verbose: bool):
    """The run, from the checks that need the cluster to its record: refused before anything is
    written; on the way out summary.json and the reports written (and copied up), or, where no stage
    finished and nothing can be resumed, everything it wrote removed: the corrected command runs into
    the same output.dir."""
    run.resources = resources
    run.summary["timeline"]["ray_ready"] = time.time()
    _check_shared_storage(run)
    _check_worker_group_fits(run.cfg, resources, sweep="tune" in stages)
    run.resolved = _resolve(run, training=any(s in stages for s in ("train", "tune", "distill")))
    run.cfg = run.resolved.run
    created = _open_run_dir(run, dump_yaml(run.cfg))
    if run.resume:
        run.finished = _finished_stages(run.run_dir)
        if (run.run_dir / "summary.json").exists():
            run.reads_before = json.loads((run.run_dir / "summary.json").read_text()).get("data_in_memory", {})
    try:
        run.live = Live(run.run_dir, run.console, run.cfg.output.tensorboard, run.cfg.output.mlflow, run.resolved.dump(),
                        verbose, name=run.remote.rstrip("/").rsplit("/", 1)[-1] if run.remote else None)
    except BaseException:
        if not run.resume:
            discard(run.run_dir, run.remote, created)
        raise
    kept = True
    try:
        yield
        run.summary["status"] = "succeeded"
    except BaseException as exc:
        run.summary.update(status="failed", failed_stage=run.current, error=failure_line(exc))
        kept = run.resume or bool(run.summary["stages"])
        raise
    finally:
        if kept:
            _write_record(run)
        else:
            run.live.finish(run.summary, [])  # an MLflow server's run is ended, marked failed
        run.live.close()
        if not kept:
            discard(run.run_dir, run.remote, created)


def _open_run_dir(run: Run, config_text: str) -> bool:
    """Make the run directory ready: a new run claims it (its manifest, written only where none is)
    and writes its config; a resumed one is copied down from its URI. Returns whether this run
    created the (local) folder."""
    created = not run.run_dir.exists()
    if run.resume:
        if run.remote:  # the staging folder starts as the URI holds the run: all but ray/
            download(run.remote, run.run_dir)
        return False
    refused = claim(run.remote or str(run.run_dir))
    if refused:
        raise ConfigError([refused])
    if run.remote:  # the URI was empty: so is its staging folder (another run's leftovers go)
        shutil.rmtree(run.run_dir, ignore_errors=True)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.remote:
        (run.run_dir / MANIFEST).write_text(read_text(join(run.remote, MANIFEST)))
    (run.run_dir / "config.yaml").write_text(config_text)
    return created


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


def _check_shared_storage(run: Run) -> None:
    """On a multi-node cluster, refuse a run directory or data cache that some node cannot see."""
    from cluster.storage import nodes_missing

    default = "~/.cache/raylaunch/data" if run.remote else "beside output.dir"
    cache = "data.cache_dir" if run.cfg.data.cache_dir else f"data.cache_dir (default: {default})"
    # A URI output.dir is storage every node reaches; the data cache is still a folder.
    folders = {cache: run.cache_root} if run.remote else {"output.dir": run.run_dir, cache: run.cache_root}
    count, missing = nodes_missing(folders)
    problems = [f"{name}: {folders[name]} is not on storage every node sees: {', '.join(nodes)} of this "
                f"{count}-node cluster do not see a file written there (a disk of "
                f"this machine only); checkpoints, the data cache and models must be on a filesystem mounted at the same "
                f"path on every node (NFS, EFS, Filestore, a Kubernetes ReadWriteMany volume)"
                for name, nodes in missing.items() if nodes]
    if problems:
        raise ConfigError(problems)


# The model each training stage leaves in models/<role>/, for a resumed run to pick up (a sweep
# records its role: a sweep of distill paths picks the student; the quantize stage lists its
# models in its result).
_ROLES = {"train": "teacher", "distill": "student"}
_RESUMABLE = ("train", "tune", "distill", "quantize")


def _stage_models(run_dir: Path, name: str, result: dict) -> dict[str, Path]:
    if name == "quantize":
        return {n: Path(m["path"]) for n, m in result.get("models", {}).items()}
    role = result.get("role", "teacher") if name == "tune" else _ROLES[name]
    return {role: run_dir / "models" / role}


def _finished_stages(run_dir: Path) -> dict[str, dict]:
    """The stages an earlier, interrupted run of this directory finished (evaluation always reruns;
    preprocessing too: it finds its cache entry, or rebuilds one that was removed)."""
    summary_file = run_dir / "summary.json"
    stages = json.loads(summary_file.read_text()).get("stages", {}) if summary_file.exists() else {}
    return {name: result for name, result in stages.items()
            if name in _RESUMABLE and all(p.exists() for p in _stage_models(run_dir, name, result).values())}


def _restore(run: Run, name: str, result: dict) -> None:
    run.models.update(_stage_models(run.run_dir, name, result))
    if name == "quantize":
        run.summary["models"].update({n: dict(m) for n, m in result["models"].items()})
    run.summary["stages"][name] = result
    run.console.print(f"[dim]↷ {name:<10} finished before; kept[/]")


def _check_worker_group_fits(cfg: RunConfig, resources: dict, sweep: bool) -> None:
    """Refuse a worker group the cluster can never hold (the configured one, or the largest a
    sweep's trial can sample), instead of waiting for it forever."""
    if sweep:
        from tuning.packing import packing_problems

        problems = packing_problems(cfg, resources)
        if problems:
            raise ConfigError(problems)
    demand = worker_group_demand(cfg.train.workers, cfg.train.cpus_per_worker, cfg.train.use_gpu)
    missing = missing_resources(resources, demand)
    if missing:
        raise ConfigError([
            f"train.workers: {cfg.train.workers} workers need {describe(demand)} but the Ray cluster has "
            f"{describe({k: resources.get(k, 0.0) for k in demand})} (short by {describe(missing)}); "
            f"lower train.workers or train.cpus_per_worker, or add nodes"
        ])


def _resolve(run: Run, training: bool) -> ResolvedConfig:
    """The config this run uses, resolved once: `zero.stage: auto` planned against the cluster (a
    model no stage can hold is refused where it would train; a resumed run keeps the stage it
    trained with), the user's DeepSpeed JSON read here (trials and workers may run where it is not)."""
    from launcher.plan import check_plan, make_plan

    cfg, stage = run.cfg, None
    if cfg.train.zero.stage == "auto" and run.resume:
        stage = _saved_zero_stage(run)
        if stage is not None:  # its checkpoints are that stage's
            run.console.print(f"  zero.stage auto -> {stage}, as the interrupted run resolved it")
    if training or (cfg.train.zero.stage == "auto" and stage is None):
        plan = make_plan(cfg, run.resources)
        run.summary["plan"] = plan.summary()
        if training:
            chosen = check_plan(plan)
        else:  # nothing trains: the stage is only recorded
            chosen = plan.chosen_stage if plan.chosen_stage is not None else 3
        if cfg.train.zero.stage == "auto" and stage is None:
            stage = chosen
            run.console.print(f"  zero.stage auto -> {stage} ({plan.params:,} parameters, "
                              f"{plan.stages[stage].device_bytes / 2**20:.1f} MiB of model states per worker)")
    user = None
    if cfg.train.deepspeed_config:
        from trainers.deepspeed_config import read_user_config

        user = read_user_config(cfg.train.deepspeed_config)
    resolved = ResolvedConfig.of(cfg, zero_stage=stage, deepspeed_user=user, resources=run.resources)
    run.summary["zero_stage"] = resolved.run.train.zero.stage
    return resolved


def _saved_zero_stage(run: Run) -> int | None:
    """The ZeRO stage the interrupted run resolved `auto` to, from its config.yaml (None for a run
    written before config.yaml held the resolved config)."""
    import yaml

    text = read_text(join(run.remote or str(run.run_dir), "config.yaml"))
    stage = (((yaml.safe_load(text) or {}) if text else {}).get("train") or {}).get("zero", {}).get("stage")
    return stage if isinstance(stage, int) else None


@contextmanager
def _stage(run: Run, name: str):
    run.summary["timeline"][f"{name}_start"] = time.time()
    started = time.perf_counter()
    with run.live.stage(name):
        try:
            yield
        except BaseException:
            run.console.print(f"[red]✗ {name:<10}[/] failed after {time.perf_counter() - started:.0f} s")
            raise
    result = run.summary["stages"][name]
    result["seconds"] = round(time.perf_counter() - started, 1)
    # One line however narrow the console (a log file is 80 columns): what grep and a reader expect.
    run.console.print(f"[green]✓ {name:<10}[/] {stage_line(name, result, run.summary, run.cfg)}  "
                      f"[dim]({result['seconds']:.0f} s)[/]", soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# The stages. Each returns the dict kept under summary["stages"][name] (launcher.report.stage_line
# prints it as one line).


def _preprocess(run: Run) -> dict:
    from dataprep.cache import prepare

    data = run.resolved.dump()["data"]
    bar = run.live.bar("rows written", None)

    def progress(rows: int, expected: int | None) -> None:
        run.live.update(bar, completed=rows, total=expected)

    run.data_meta, run.data_dir, reused = prepare(data, run.cfg.model.seq_len, run.cache_root, progress)
    (run.run_dir / "data.json").write_text(json.dumps({"path": str(run.data_dir), "key": run.data_meta["cache_key"]}, indent=1))
    meta = run.data_meta
    result = {"rows": meta["rows"], "cache": {"path": str(run.data_dir), "key": meta["cache_key"], "reused": reused},
              "bad_rows": meta.get("bad_rows", {}), "files": meta["files"]}
    if meta["task"] == "lm":
        return result | {"tokens": meta["tokens"], "tokenizer": meta["tokenizer"], "seq_len": meta["seq_len"]}
    return result | {"num_classes": meta["num_classes"], "input_shape": meta["input_shape"]}


def _train(run: Run) -> dict:
    from trainers.fit import best_checkpoint, build_trainer, fit, splits_in_memory
    from trainers.worker import worker_config

    config = worker_config(run.resolved, run.data_meta)
    (run.run_dir / "deepspeed.json").write_text(json.dumps(config.deepspeed, indent=1))
    resumed = _resume_point(run, "train")
    splits = _splits(run, "train")
    with _reports(run, "teacher", config) as reports:
        result = fit(build_trainer(config, splits, run.storage, name="train", callbacks=[reports.callback()]),
                     config.train)
    checkpoint, metrics = best_checkpoint(result, config.metric)
    run.models["teacher"] = _keep_model(checkpoint, run.run_dir / "models" / "teacher", run.data_dir)
    return _training_summary("teacher", metrics, run.cfg) | resumed | {"data_in_memory": splits_in_memory(splits)}


def _splits(run: Run, stage: str, train_dir: str | None = None, trainers: int = 1) -> dict:
    """The train and val splits for a training stage, held in memory as `data.in_memory` says
    (`trainers`: the training runs at once that cut shards from them). How they are read decides
    which rows each rank trains on: it is recorded before training starts, and a resume that would
    read them the other way (`auto` deciding otherwise on another machine) is refused."""
    from trainers.fit import load_splits, splits_in_memory

    splits = load_splits(run.data_dir, run.cfg.data.in_memory, run.cfg.data.ingest_memory_mb, train_dir, trainers)
    held, before = splits_in_memory(splits), run.reads_before.get(stage)
    if before is not None and before != held:
        how = {True: "held in memory", False: "streamed"}
        raise ConfigError([f"data.in_memory: the interrupted {stage} stage read its splits {how[before]} and this run "
                           f"would read them {how[held]}, which gives each rank other rows; continue it exactly with "
                           f"--set data.in_memory={str(before).lower()}"])
    run.summary.setdefault("data_in_memory", {})[stage] = held
    write_summary(run.run_dir, run.summary)
    run.sync()
    return splits


def _tune(run: Run) -> dict:
    from launcher.report import print_trials
    from trainers.fit import splits_in_memory
    from tuning.results import write_trials
    from launcher.live import SweepProgress
    from tuning.packing import pack, trial_count
    from tuning.space import max_epochs
    from tuning.sweep import run_sweep

    cfg = run.cfg
    packing = pack(cfg, run.resources)
    concurrent = packing.concurrent
    run.console.print(f"  sweep: {packing.line(cfg)}")
    dump = run.resolved.dump()
    (run.run_dir / "tune").mkdir(exist_ok=True)
    # A sweep of distill paths distills the trained teacher in every trial; precomputed, its
    # outputs are computed once for all of them.
    role, teacher_dir, train_dir = ("student" if cfg.sweeps_student else "teacher"), None, None
    if role == "student":
        teacher_dir = run.shared(run.models["teacher"])
        if cfg.distill.teacher_outputs == "precompute":
            train_dir = _precompute_teacher_outputs(run)["path"]
    # One read serves every trial; held in memory, each running trial cuts its ranks' shards from it.
    datasets = _splits(run, "tune", train_dir, trainers=concurrent)
    progress = SweepProgress(run.live, trial_count(cfg), max_epochs(dump, dump["tune"]["space"]), cfg.tune.metric)
    sweep = run_sweep(run.resolved, run.data_meta, datasets, run.storage, concurrent, run.run_dir / "tune" / "reports.jsonl",
                      resume=run.resume, teacher_dir=teacher_dir, callbacks=[progress])
    run.models[role] = _keep_model(sweep.best_checkpoint, run.run_dir / "models" / role, run.data_dir)
    files = write_trials(sweep.trials, run.run_dir / "tune", cfg.tune.metric, dump["tune"]["space"])
    # The winner's whole config: `raylaunch run tune/best_config.yaml` trains it again without a sweep.
    best = run.resolved.with_overrides(sweep.best_values).run
    best.tune.enabled = False
    (run.run_dir / "tune" / "best_config.yaml").write_text(dump_yaml(best))
    files["best_config"] = str(run.run_dir / "tune" / "best_config.yaml")
    print_trials(run.console, sweep.trials, cfg.tune.metric, list(cfg.tune.space))
    return {"role": role, "trials": sweep.trials, "best_trial": sweep.best_trial, "best_values": sweep.best_values,
            "best_metrics": sweep.best_metrics, "concurrent_trials": concurrent, **files,
            "data_in_memory": splits_in_memory(datasets), "cpu_hours": round(sum(t["cpu_hours"] for t in sweep.trials), 4),
            "gpu_hours": round(sum(t["gpu_hours"] for t in sweep.trials), 4)}


def _distill(run: Run) -> dict:
    from trainers.fit import best_checkpoint, build_trainer, fit, splits_in_memory
    from trainers.worker import worker_config

    config = worker_config(run.resolved, run.data_meta, teacher_dir=run.shared(run.models["teacher"]))
    resumed = _resume_point(run, "distill")
    precomputed = _precompute_teacher_outputs(run) if run.cfg.distill.teacher_outputs == "precompute" else {}
    splits = _splits(run, "distill", precomputed.get("path"))
    with _reports(run, "student", config) as reports:
        result = fit(build_trainer(config, splits, run.storage, name="distill", callbacks=[reports.callback()]),
                     config.train)
    checkpoint, metrics = best_checkpoint(result, config.metric)
    run.models["student"] = _keep_model(checkpoint, run.run_dir / "models" / "student", run.data_dir)
    summary = _training_summary("student", metrics, run.cfg) | resumed | {"data_in_memory": splits_in_memory(splits)}
    return summary | ({"teacher_outputs": precomputed} if precomputed else {})


def _reports(run: Run, role: str, config):
    """The training run's reports (of a `trainers.worker.WorkerConfig`'s run), as they come, to its
    progress bar and the metric logs."""
    from cluster.raycompat import ReportStream

    return ReportStream(run.live.training(role, config.total_steps, config.train.epochs))


def _precompute_teacher_outputs(run: Run) -> dict:
    """The teacher's outputs on the train split, computed once by an actor pool (kept across a
    resume: the teacher they came from is kept too)."""
    from trainers.distill import precompute_teacher_outputs

    target = run.run_dir / "distill" / "teacher_outputs"
    if run.remote:
        # Written by Ray Data tasks on any node and read by every worker: in the data cache (every
        # node sees it), under this run's URI. A new run at the URI starts them afresh.
        target = run.cache_root / "teacher-outputs" / staging_dir(run.remote).name
        if not run.resume:
            shutil.rmtree(target, ignore_errors=True)
    if (target / "train").is_dir():
        run.console.print(f"  teacher outputs: reusing {target}")
        return {"path": str(target), "reused": True}
    started = time.perf_counter()
    actors = max(1, min(4, int(run.resources.get("CPU", 1))))
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = precompute_teacher_outputs(run.shared(run.models["teacher"]), run.data_dir, target, run.data_meta,
                                      run.cfg.distill.top_k, actors)
    seconds = time.perf_counter() - started
    what = f"top {run.cfg.distill.top_k} logits per token" if run.data_meta["task"] == "lm" else "logits"
    run.console.print(f"  teacher outputs: {what} for {rows:,} train rows by {actors} actor(s) in {seconds:.1f} s")
    return {"path": str(target), "rows": rows, "actors": actors, "seconds": round(seconds, 1)}


def _quantize(run: Run) -> dict:
    """Each method's quantized model of the final fp32 model, exported, then gated: one that loses
    more than `quantize.max_drop` on the test split fails the stage and is kept, marked rejected."""
    from trainers.evaluate import first_rows, test_metrics
    from trainers.modeldir import load_model, quantize_model_dir
    from trainers.quantize import gate, rejection, unsupported_reason

    q = run.cfg.quantize
    source = "student" if "student" in run.models else "teacher"
    test_dir = run.data_dir / "test"
    baseline = run.test_metrics[source] = test_metrics(load_model(run.models[source])[0], test_dir, run.data_meta)
    # Rows of the validation split: static_int8 calibrates on them, and every export is checked
    # to reproduce its quantized model on them.
    calibration = first_rows(run.data_dir / "val", run.data_meta, q.calibration_rows)
    made, skipped = {}, {}
    for method in q.methods:
        reason = unsupported_reason(method)
        if reason:
            skipped[method] = reason
            run.console.print(f"  [yellow]{method} skipped[/]: {reason}")
            continue
        name = f"{source}-{method}"
        target = run.run_dir / "models" / name
        quantize_model_dir(run.models[source], target, method, calibration, compile=q.compile)
        model, spec = load_model(target, compiled=True)  # this run compiled it: its gate measures what ships
        if spec.get("not_compiled"):
            run.console.print(f"  [yellow]{name} not compiled[/]: {escape(spec['not_compiled'])}")
        metrics = run.test_metrics[name] = test_metrics(model, test_dir, run.data_meta)
        status, drop = gate(baseline, metrics, q.max_drop)
        made[name] = {"method": method, "status": status, "drop": drop, "path": str(target),
                      **{k: metrics[k] for k in ("accuracy", "perplexity") if k in metrics},
                      **({"not_compiled": spec["not_compiled"]} if spec.get("not_compiled") else {})}
        run.models[name] = target
        # In the summary now: a rejection below fails the stage before its result is recorded.
        run.summary["models"][name] = dict(made[name])
    refused = rejection(source, baseline, made, q.max_drop)
    if refused is not None:
        raise refused
    quality = "perplexity" if "perplexity" in baseline else "accuracy"
    return {"source": source, "baseline": {quality: baseline[quality]}, "models": made, "skipped": skipped}


def _evaluate(run: Run) -> dict:
    from trainers.evaluate import first_rows, interleaved_latency, measure, test_metrics
    from trainers.modeldir import WEIGHTS, load_model

    test_dir = run.data_dir / "test"
    example = first_rows(test_dir, run.data_meta, 1)
    # Every model here was made by this run: a compiled program among them is its own.
    loaded = {name: load_model(directory, compiled=True) for name, directory in run.models.items()}
    timings = interleaved_latency({name: model for name, (model, _) in loaded.items()}, example)
    models = {}
    for name, directory in run.models.items():
        model, spec = loaded[name]
        # The quantize stage has measured the final model and its quantized ones on the test split.
        quality = run.test_metrics.get(name) or test_metrics(model, test_dir, run.data_meta)
        numbers = measure(spec, directory / WEIGHTS, quality, timings[name])
        gate = {k: v for k, v in run.summary["models"].get(name, {}).items() if k in ("method", "status", "drop")}
        # What ran: a compiled program (its file) or, where it cannot run here, the reference program and why.
        program = {"program": spec["program"]} if "program" in spec else {}
        if "compiled" in spec:
            program["program_bytes"] = spec["compiled"]["bytes"]
        models[name] = {**numbers, **gate, **program, "path": str(directory)}
    run.summary["models"] = models
    return {}


# Every stage, by name (the order a run takes them is RunConfig.default_stages, or --stages).
STAGES = {"preprocess": _preprocess, "train": _train, "tune": _tune, "distill": _distill, "quantize": _quantize,
          "evaluate": _evaluate}


def _resume_point(run: Run, name: str) -> dict:
    """Where a resumed training run continues: the step of the latest checkpoint Ray Train kept
    for it (read from its checkpoint manager's snapshot: cluster.raycompat, 4)."""
    experiment = join(str(run.storage), name)
    text = read_text(join(experiment, CHECKPOINT_SNAPSHOT)) if run.resume else None
    if text is None:
        return {}
    # A driver killed while its workers were uploading a checkpoint leaves that folder behind,
    # possibly half written, which Ray Train never registered and will never read: remove it.
    registered = registered_checkpoints(text)
    if registered is None:
        run.console.print(f"  [yellow]{name}: Ray Train's checkpoint snapshot is not in the form raylaunch knows; "
                          f"every checkpoint folder is kept[/]")
        return {}
    dropped = remove_dirs(experiment, "checkpoint_", keep=registered)
    if dropped:
        run.console.print(f"  {name}: removed {len(dropped)} unregistered checkpoint folder(s) the interrupted run "
                          f"left half written: {', '.join(dropped)}")
    latest = latest_checkpoint_metrics(text)
    if "step" not in latest:
        return {}
    run.console.print(f"  {name}: continuing from the checkpoint at step {latest['step']} (epoch {latest['epoch']:.2f})")
    return {"resumed_from_step": latest["step"]}


def _keep_model(checkpoint: str, target: Path, data_dir: Path) -> Path:
    """Copy a checkpoint's consolidated model (not its DeepSpeed training state) out of Ray's
    storage (a path or a URI) into the run's models/ folder; the folder appears complete or not at all."""
    from trainers.modeldir import SPEC, WEIGHTS
    from dataprep import TOKENIZER_FILE

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fetch(checkpoint, (WEIGHTS, SPEC), tmp)
    tokenizer = data_dir / TOKENIZER_FILE
    if tokenizer.exists():  # a BPE model carries its tokenizer: `raylaunch predict` needs it
        shutil.copy2(tokenizer, tmp / TOKENIZER_FILE)
    # A driver killed after an earlier copy and before the summary recorded its stage left one:
    # the stage ran again, and its model replaces it.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _training_summary(role: str, metrics: dict, cfg: RunConfig) -> dict:
    """What the summary keeps of a training stage: the best checkpoint's metrics, where it ran."""
    keys = ("epoch", "step", "val_accuracy", "val_loss", "val_perplexity", "train_loss", "samples_per_s", "tokens_per_s")
    kept = {k: metrics[k] for k in keys if k in metrics}
    return {**kept, "zero_stage": cfg.train.zero.stage, "workers": cfg.train.workers}
