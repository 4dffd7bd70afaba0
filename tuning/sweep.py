"""The tune stage: a Ray Tune sweep in which every trial is a whole TorchTrainer run.

Each trial function builds and fits a TorchTrainer; a Ray Train callback of ours forwards the
workers' reports (under PBT with their checkpoints) to Tune, so ASHA sees intermediate validation
metrics and stops weak trials mid-run. A sweep of teacher paths trains teachers; a sweep of
distill paths only (temperature, alpha, the student) distills the trained teacher in every trial.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from cluster.raycompat import CHECKPOINT_PATH, ReportStream, sigint_reaches_caller
from cluster.remote import exists, join, read_text, to_uri
from cluster.resources import worker_group_demand
from dataprep.meta import DataMeta
from runconfig.resolved import ResolvedConfig, apply_overrides
from runconfig.schema import metric_mode
from trainers.fit import build_trainer, fit, storage_uri
from trainers.loop import POSITION
from trainers.modeldir import SPEC
from trainers.worker import worker_config
from tuning.space import max_epochs, mutation_domain, planned_epochs, tune_domain

# The trial function only waits on its TorchTrainer; the workers hold the real resources. It asks
# for memory, not CPU: even 0.01 CPU would leave 1.99 of 2 CPUs, too few for a 2 x 1-CPU group.
# (Ray refuses a trial with no resources at all: "an empty head and zero worker bundles".)
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}


class SweepFailed(Exception):
    """Every trial failed; the message lists why."""


@dataclass
class SweepResult:
    trials: list[dict]
    """One row per trial: id, sampled values, epochs run, best metric, status, error, wall time,
    CPU-hours and GPU-hours."""
    best_trial: str
    best_checkpoint: str
    """A local path, or a URI for storage at one."""
    best_metrics: dict
    best_values: dict


def _trial(sampled: dict, resolved: ResolvedConfig, data_meta: DataMeta, datasets: dict, storage_path: str, pbt: bool,
           teacher_dir: str | None) -> None:
    trial_id = tune.get_context().get_trial_id()
    config = worker_config(resolved.with_overrides(sampled), data_meta, teacher_dir=teacher_dir).replace(trial=trial_id)
    name, checkpoint, origin = f"trial-{trial_id}", tune.get_checkpoint(), ""
    if checkpoint is not None:
        # A Tune checkpoint: under PBT, a top trial's (an exploit) or this trial's own (PBT pauses
        # running trials while another waits, and resumes them later). Training continues from it in
        # a new Ray Train run named after it: a restart from the same checkpoint continues that run.
        source = _position(checkpoint)
        name = f"trial-{trial_id}-from-{source['trial']}-step{source['step']}"
        config = config.replace(start_from=to_uri(checkpoint.filesystem, checkpoint.path))
        if source["trial"] != trial_id:
            origin = f"{source['trial']}@{source['step']}"
    with ReportStream(_to_tune(pbt, origin, config.train.epochs)) as reports:
        fit(build_trainer(config, datasets, storage_path, name=name, callbacks=[reports.callback()]), config.train)


def _position(checkpoint) -> dict:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{POSITION}") as f:
        return json.loads(f.read())


def _to_tune(pbt: bool, origin: str, epochs: int) -> Callable[[dict], None]:
    """Reports to Tune what the trial's training run reports: the metrics (so schedulers see every
    epoch), and under PBT the checkpoint too, which Tune then keeps a copy of in the trial's
    directory for other trials to continue from. (Ray's own `TuneReportCallback` forwards metrics
    only: PBT would find no checkpoint to exploit.) The report at the last epoch says `done`: Tune
    then ends the trial there instead of asking the scheduler, which under PBT could still replace
    a finished trial with a copy of a better one's final checkpoint (a restart that trains nothing)
    or, with `tune.synch`, pause it to wait for the others."""

    def report(item: dict) -> None:
        item["origin"] = origin
        if item.get("epoch", 0) >= epochs:
            item["done"] = True
        path = item.get(CHECKPOINT_PATH)
        tune.report(item, checkpoint=tune.Checkpoint(path) if pbt and path else None)

    return report


class ReportLog(tune.Callback):
    """Every report of every trial, as Tune's driver receives it, one JSON line each (appended,
    so a resumed sweep adds to it). The sweep's summary is read from here: Tune's own per-trial
    result.json loses the reports before a restart when a trial is restored from a checkpoint
    (PBT pauses and exploits), and a trial's config changes under PBT, so each line has its own."""

    def __init__(self, path: Path):
        self.path = str(path)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = {"trial": Path(trial.path).name, **result}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


def read_reports(path: Path) -> dict:
    """The report log as one DataFrame per trial (by trial directory name)."""
    import pandas as pd

    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    frame = pd.DataFrame(rows)
    return {name: group.reset_index(drop=True) for name, group in frame.groupby("trial", sort=False)} if rows else {}


def run_sweep(resolved: ResolvedConfig, data_meta: DataMeta, datasets: dict, storage_path: Path, max_concurrent: int,
              reports: Path, resume: bool = False, teacher_dir: str | None = None,
              callbacks: Sequence[tune.Callback] = ()) -> SweepResult:
    """Sample `tune.num_samples` configs from `tune.space` and train each on `datasets` (as
    `trainers.fit.load_splits` gives them); returns every trial's outcome and the best checkpoint
    by `tune.metric` over all epochs of all trials. With `teacher_dir`, each trial distills that
    teacher into a student. Every report is logged to `reports` (JSON lines); `callbacks` are more
    of Tune's driver callbacks (progress, metric logs)."""
    run = resolved.dump()
    settings = run["tune"]
    metric, mode = settings["metric"], metric_mode(settings["metric"])
    if settings["scheduler"] == "asha":
        # Time in epochs, not reports: with train.checkpoint_every a trial reports several times an epoch.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs(run, settings["space"]),
                                  grace_period=settings["grace_period"], reduction_factor=settings["reduction_factor"])
    elif settings["scheduler"] == "pbt":
        # Time in epochs too. Tune keeps every checkpoint a trial reports (the default), so the one
        # an exploit picks cannot be deleted while the exploiting trial starts from it.
        scheduler = PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=settings["perturbation_interval"],
            hyperparam_mutations={path: mutation_domain(domain) for path, domain in settings["space"].items()},
            quantile_fraction=settings["quantile_fraction"], resample_probability=settings["resample_probability"],
            synch=settings["synch"], log_config=False)
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_parameters(_trial, resolved=resolved, data_meta=data_meta, datasets=datasets,
                                     storage_path=storage_uri(storage_path), pbt=settings["scheduler"] == "pbt",
                                     teacher_dir=teacher_dir)
    trainable = tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)
    experiment = join(storage_uri(storage_path), "tune")
    sigint_reaches_caller()  # Ctrl-C interrupts the run, not just the trials (cluster.raycompat, 10)
    if resume and tune.Tuner.can_restore(experiment):
        # A sweep whose driver died: finished trials are kept, unfinished ones continue (each trial's
        # TorchTrainer finds its own checkpoints under the same name), errored ones run again.
        grid = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True).fit()
        return _summarize(grid, read_reports(reports), run, metric, mode)
    Path(reports).unlink(missing_ok=True)
    tuner = tune.Tuner(
        trainable,
        param_space={path: tune_domain(domain, settings["search"]) for path, domain in settings["space"].items()},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                    num_samples=1 if settings["search"] == "grid" else settings["num_samples"],
                                    search_alg=search_algorithm(settings["search"], metric, mode, run["train"]["seed"],
                                                                max_concurrent),
                                    time_budget_s=settings["time_budget_s"]),
        run_config=tune.RunConfig(name="tune", storage_path=storage_uri(storage_path), verbose=0,
                                  callbacks=[ReportLog(Path(reports).resolve()), *callbacks]),
    )
    started = time.monotonic()
    grid = tuner.fit()
    try:
        return _summarize(grid, read_reports(reports), run, metric, mode)
    except SweepFailed as exc:
        budget = settings["time_budget_s"]
        if budget is not None and time.monotonic() - started >= budget:
            raise SweepFailed(f"tune.time_budget_s: the sweep's {budget:g} s ran out before any trial reported {metric} "
                              f"(a trial needs its worker group started and one epoch); raise it. {exc}") from None
        raise


def search_algorithm(search: str, metric: str, mode: str, seed: int, max_concurrent: int):
    """Ray Tune's searcher for `tune.search`, limited to `max_concurrent` trials at once (Tune
    ignores `TuneConfig.max_concurrent_trials` when given a searcher instance)."""
    if search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=seed))
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _summarize(grid, histories: dict, run: dict, metric: str, mode: str) -> SweepResult:
    """One row per trial of `grid` (its final config, error) from its reports in `histories`."""
    trials, best = [], None
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    for result in grid:
        values = _config_of(result)
        epochs_planned = planned_epochs(run, run["tune"]["space"], values)
        history = histories.get(Path(result.path).name)
        row = {"trial": Path(result.path).name, **values, "epochs_run": 0, metric: math.nan,
               "status": "error" if result.error else "completed", "error": _one_line(result.error)}
        row.update(_usage(apply_overrides(run, values)["train"], history))
        # PBT: the checkpoints ("trial@step") of other trials this trial continued from, in order.
        origins = history["origin"].dropna() if history is not None and "origin" in history else []
        row["continued_from"] = " ".join(dict.fromkeys(o for o in origins if o))
        if history is not None and len(history) and metric in history:
            scored = history.dropna(subset=[metric])
            top = scored.loc[scored[metric].idxmax() if mode == "max" else scored[metric].idxmin()]
            row.update({"epochs_run": int(history["epoch"].max()), metric: float(top[metric])})
            if not result.error and row["epochs_run"] < epochs_planned:
                row["status"] = "stopped early"
            # The best checkpoint still on disk: Ray Train keeps `train.keep_checkpoints` by score,
            # and of two reports tied on the metric it may have kept the later one.
            kept = scored[scored[CHECKPOINT_PATH].map(_kept)] if CHECKPOINT_PATH in scored else scored.iloc[:0]
            if len(kept):
                pick = kept.loc[kept[metric].idxmax() if mode == "max" else kept[metric].idxmin()]
                if best is None or better(pick[metric], best[1][metric]):
                    best = (row["trial"], pick.to_dict(), values)
        trials.append(row)
    if best is None:
        reasons = "; ".join(f"{t['trial']}: {t['error'] or 'reported no metrics'}" for t in trials)
        raise SweepFailed(f"all {len(trials)} trials failed: {reasons}")
    name, metrics, values = best
    return SweepResult(trials=trials, best_trial=name, best_checkpoint=metrics[CHECKPOINT_PATH],
                       best_metrics={k: v for k, v in metrics.items() if k in (metric, "epoch", "val_loss", "val_accuracy")},
                       best_values=values)


def _config_of(result) -> dict:
    """A trial's (last) values. A trial that never reported (the time budget ran out first) has
    none in its Result; Tune wrote them to params.json if it got as far as starting it."""
    if result.config is not None:
        return dict(result.config)
    params = read_text(join(to_uri(result.filesystem, result.path), "params.json"))
    return json.loads(params) if params is not None else {}


def _usage(train: dict, history) -> dict:
    """A trial's wall time (the sum of Tune's `time_this_iter_s` over its reports: the time it
    ran, restarts included) and what its worker group held for it: CPU-hours and GPU-hours."""
    wall = float(history["time_this_iter_s"].sum()) if history is not None and "time_this_iter_s" in history else 0.0
    demand = worker_group_demand(train["workers"], train["cpus_per_worker"], train["use_gpu"])
    return {"wall_s": round(wall, 1), "cpu_hours": round(demand["CPU"] * wall / 3600, 4),
            "gpu_hours": round(demand.get("GPU", 0.0) * wall / 3600, 4)}


def _kept(checkpoint_path) -> bool:
    # model.json is written after the weights (whatever files they are: sharded, an adapter)
    return isinstance(checkpoint_path, str) and exists(join(checkpoint_path, SPEC))


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
