"""What a run shows while it runs: progress bars with an ETA on the console, and every training
report written to TensorBoard event files (and MLflow, with `output.mlflow`).

Reports reach the driver two ways: a train or distill stage's through `trainers.fit.ReportStream`
(a thread of the driver), a sweep's trials' through Tune's driver callbacks (`SweepProgress`).
Both call `Live.report(run_name, report)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ray import tune
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from runconfig.schema import metric_mode

MLFLOW_DB = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"
METRICS_DIR = "metrics"
"""Every report of each training run, as JSON lines: metrics/<run>.jsonl."""
# Per report, what goes to the logs under which name (the per-step loss and lr come from step_log).
REPORT_SCALARS = {"val_loss": "val/loss", "val_accuracy": "val/accuracy", "val_perplexity": "val/perplexity",
                  "train_loss": "train/loss_per_report", "samples_per_s": "train/samples_per_s",
                  "tokens_per_s": "train/tokens_per_s", "epoch": "epoch", "skipped_batches": "train/skipped_batches",
                  "gpu_memory_peak_mb": "train/gpu_memory_peak_mb", "data_wait_s": "train/data_wait_s",
                  "step_time_p50_s": "train/step_time_p50_s", "step_time_max_s": "train/step_time_max_s",
                  "epoch_start_wait_s": "train/epoch_start_wait_s"}


def stage_progress(console: Console) -> Progress:
    """The console's live area while a stage runs: a spinner line, and a bar per long loop."""
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=28),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=True,
                    # A log file (a Ray job's console) gets the stage lines only, not frames of bars.
                    disable=not console.is_terminal)


class Live:
    """The run's progress display and metric logs; `close()` at the end of the run."""

    current: Live | None = None
    """The display of the run this process drives (for callbacks Tune unpickles on a resume)."""

    def __init__(self, run_dir: Path, console: Console, tensorboard: bool, mlflow: bool | str, params: dict,
                 verbose: bool = False, name: str | None = None):
        """`name`: the run's name in MLflow (default: the run directory's)."""
        Live.current = self
        self.run_dir, self.console = run_dir, console
        self.progress: Progress | None = None
        self._lock = threading.Lock()
        self._writers: dict = {}
        self._tensorboard = tensorboard
        self.failed: dict[str, str] = {}
        """Metric logs that failed, with why."""
        self._mlflow = _MlflowLog(run_dir, mlflow, params, verbose, name or run_dir.name) if mlflow else None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with stage_progress(self.console) as progress:
            self.progress = progress
            progress.add_task(f"{name} running", total=None, info="")
            try:
                yield
            finally:
                self.progress = None

    def bar(self, description: str, total: float | None) -> TaskID | None:
        return self.progress.add_task(description, total=total, info="") if self.progress is not None else None

    def update(self, task: TaskID | None, **fields) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, **fields)

    def report(self, run: str, item: dict) -> None:
        """One training report of `run` ("teacher", "student", "trial-<id>") to the metric logs."""
        step = int(item.get("step", 0))
        scalars = {name: float(item[key]) for key, name in REPORT_SCALARS.items()
                   if isinstance(item.get(key), int | float) and math.isfinite(item[key])}
        steps = [row for row in item.get("step_log") or [] if len(row) == 3]
        with self._lock:
            # The report itself, for report.html's curves (readable without TensorBoard).
            history = self.run_dir / METRICS_DIR / f"{run}.jsonl"
            history.parent.mkdir(exist_ok=True)
            with open(history, "a") as f:
                f.write(json.dumps({k: v for k, v in item.items() if k in (*REPORT_SCALARS, "step", "step_log", "startup")}) + "\n")
            if self._tensorboard:
                self._write("TensorBoard", lambda: self._tensorboard_report(run, step, scalars, steps))
            if self._mlflow:
                self._write("MLflow", lambda: self._mlflow.report(run, step, scalars, steps))

    def _tensorboard_report(self, run: str, step: int, scalars: dict, steps: list) -> None:
        writer = self._writer(run)
        for s, loss, lr in steps:
            writer.add_scalar("train/loss", loss, int(s))
            writer.add_scalar("train/lr", lr, int(s))
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        writer.flush()

    def _write(self, sink: str, write: Callable[[], None]) -> None:
        """A metric log that fails (a full disk, an MLflow server gone) is said once on the console
        and no longer written to; training goes on."""
        if sink in self.failed:
            return
        try:
            write()
        except Exception as exc:
            self.failed[sink] = f"{type(exc).__name__}: {exc}"
            self.console.print(f"[yellow]{sink} logging stopped[/]: {self.failed[sink]}", highlight=False)

    def training(self, run: str, total_steps: int, epochs: int) -> _TrainingBar:
        """A bar over a training run's optimizer steps, fed by its reports."""
        return _TrainingBar(self, run, total_steps, epochs)

    def finish(self, summary: dict, files: list[Path]) -> None:
        """The run's final numbers and files to MLflow (TensorBoard has its curves already)."""
        with self._lock:
            if self._mlflow:
                self._write("MLflow", lambda: self._mlflow.finish(summary, [f for f in files if f.exists()]))

    def close(self) -> None:
        if Live.current is self:
            Live.current = None
        with self._lock:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()

    def _writer(self, run: str):
        if run not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[run] = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR / run))
        return self._writers[run]


class _TrainingBar:
    def __init__(self, live: Live, run: str, total_steps: int, epochs: int):
        self.live, self.run, self.epochs = live, run, epochs
        self.task = live.bar(f"{run} steps", total_steps)
        self.events: list[dict] = []
        """Each restore of the worker group (after a failure or a preemption, or to resize it) and each
        preemption notice, as `training_events` tells them."""
        self.workers: int | None = None

    def __call__(self, item: dict) -> None:
        for event in training_events(item, self.workers):
            self.events.append(event)
            self.live.console.print(f"  {self.run}: {event_line(event)}", highlight=False)
        self.workers = item.get("workers", self.workers)
        self.live.report(self.run, item)
        info = f"epoch {item.get('epoch', 0):.1f}/{self.epochs}"
        for key in ("val_accuracy", "val_perplexity"):
            if key in item:
                info += f"  {key.replace('_', ' ')} {item[key]:.4f}"
        self.live.update(self.task, completed=item.get("step", 0), info=info)


def training_events(item: dict, workers: int | None) -> list[dict]:
    """What a report says happened to its run: the group restored from a checkpoint (`resize` when
    on another worker count than the reports before it, else `restore`), with the step it went on
    from and the steps the lost group had trained past it (None: not known); a preemption notice
    answered by this report's checkpoint."""
    events = []
    restored = item.get("restored")
    if restored is not None:
        kind = "resize" if workers is not None and restored["workers"] != workers else "restore"
        events.append({"kind": kind, "step": restored["step"], "workers": restored["workers"],
                       "lost_steps": restored["lost_steps"]})
    notice = item.get("preemption")
    if notice is not None:
        left = None if notice["deadline_ms"] is None else round((notice["deadline_ms"] - notice["noticed_ms"]) / 1000, 1)
        events.append({"kind": "preemption", "step": item["step"], "ranks": notice["ranks"], "seconds_left": left})
    return events


def event_line(event: dict) -> str:
    lost = "steps lost unknown" if event.get("lost_steps") is None else f"{event['lost_steps']} step(s) lost"
    if event["kind"] == "preemption":
        left = "" if event["seconds_left"] is None else f", {event['seconds_left']} s before its deadline"
        return f"preemption of rank(s) {event['ranks']} noticed: checkpoint at step {event['step']}{left}"
    if event["kind"] == "resize":
        return f"resized to {event['workers']} worker(s), going on from step {event['step']} ({lost})"
    return f"restarted on {event['workers']} worker(s) from step {event['step']} ({lost})"


class SweepProgress(tune.Callback):
    """Tune's driver callbacks: a bar over trials and one over all trials' epochs (ASHA and the
    time budget end trials early, so the epochs' ETA is an upper bound), and every trial's
    reports to the metric logs as `trial-<id>`."""

    def __init__(self, live: Live, trials: int, epochs_per_trial: int, metric: str):
        self.live, self.metric, self.epochs_per_trial = live, metric, epochs_per_trial
        self.trials, self.ended, self.epochs_total = trials, 0, float(trials * epochs_per_trial)
        self.epochs: dict[str, float] = {}
        self.best: float | None = None
        self.events: list[dict] = []
        """Each trial's restores, resizes and preemptions (`training_events`, with the trial's id)."""
        self.workers: dict[str, int] = {}
        self._bars()

    def _bars(self) -> None:
        """The two bars on the display, at the counts so far (zero, or where a restored sweep was)."""
        self.trials_task = self.epochs_task = None
        if self.live is None:
            return
        self.trials_task = self.live.bar("trials done", self.trials)
        self.epochs_task = self.live.bar("trial epochs", self.epochs_total)
        self.live.update(self.trials_task, completed=self.ended)
        self.live.update(self.epochs_task, completed=sum(self.epochs.values()))

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into the experiment's state; the display stays in this process.
        return {**self.__dict__, "live": None, "trials_task": None, "epochs_task": None}

    def __setstate__(self, state: dict) -> None:
        # `Tuner.restore` (a resumed sweep) unpickles the callbacks in the driver that resumes it:
        # they show on that driver's display and write to its metric logs, from where they were.
        self.__dict__.update(state)
        self.live = Live.current
        self._bars()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for event in training_events(result, self.workers.get(trial.trial_id)):
            self.events.append({**event, "trial": trial.trial_id})
            if self.live is not None:
                self.live.console.print(f"  trial {trial.trial_id}: {event_line(event)}", highlight=False)
        if "workers" in result:
            self.workers[trial.trial_id] = result["workers"]
        if self.live is None:
            return
        self.live.report(f"trial-{trial.trial_id}", result)
        self.epochs[trial.trial_id] = float(result.get("epoch", 0))
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            better = max if metric_mode(self.metric) == "max" else min
            self.best = value if self.best is None else better(self.best, value)
        self.live.update(self.epochs_task, completed=sum(self.epochs.values()),
                         info=f"best {self.metric} {self.best:.4f}" if self.best is not None else "")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def _ended(self, trial) -> None:
        self.ended += 1
        # A trial stopped early runs no more epochs: take the ones it will not run off the total.
        unrun = max(self.epochs_per_trial - self.epochs.get(trial.trial_id, 0.0), 0.0)
        self.epochs_total = max(self.epochs_total - unrun, 0.0)
        if self.live is not None:
            self.live.update(self.trials_task, completed=self.ended)
            self.live.update(self.epochs_task, total=self.epochs_total)


class _MlflowLog:
    """One MLflow run for the pipeline run (its config as params, its final numbers), a nested
    run per training run (teacher, student, each trial) with its curves."""

    def __init__(self, run_dir: Path, target: bool | str, params: dict, verbose: bool, name: str):
        from mlflow.tracking import MlflowClient

        # A tracking server that goes away mid-run: MLflow's default retries take minutes per call,
        # and training waits on each report. A few seconds, then this log stops (Live._write).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # MLflow sets its loggers to INFO when imported (and its store logs its table set-up).
        for logger in ("mlflow", "alembic"):
            logging.getLogger(logger).setLevel(logging.INFO if verbose else logging.WARNING)

        local = target is True
        uri = f"sqlite:///{run_dir / MLFLOW_DB}" if local else str(target)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=(run_dir / "mlflow-artifacts").as_uri() if local else None)
        self.experiment_id = experiment_id
        self.parent = self.client.create_run(experiment_id, run_name=name).info.run_id
        self.client.log_batch(self.parent, params=_params(params))
        self.children: dict[str, str] = {}

    def report(self, run: str, step: int, scalars: dict, steps: list) -> None:
        from mlflow.entities import Metric

        if run not in self.children:
            self.children[run] = self.client.create_run(
                self.experiment_id, run_name=run, tags={"mlflow.parentRunId": self.parent}).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(name.replace("/", "_"), value, now, step) for name, value in scalars.items()]
        for s, loss, lr in steps:
            metrics += [Metric("train_loss_step", float(loss), now, int(s)), Metric("train_lr", float(lr), now, int(s))]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.children[run], metrics=metrics[start:start + 1000])

    def finish(self, summary: dict, files: list[Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{model}_{key}", float(value), now, 0) for model, numbers in summary.get("models", {}).items()
                   for key, value in numbers.items()
                   if key in ("accuracy", "perplexity", "size_bytes", "latency_ms_p50", "latency_ms_p95", "rows_per_s_b64",
                              "gen_tokens_per_s_b1", "gen_tokens_per_s_b8")]
        if metrics:
            self.client.log_batch(self.parent, metrics=metrics)
        for path in files:
            self.client.log_artifact(self.parent, str(path))
        status = "FINISHED" if summary.get("status") == "succeeded" else "FAILED"
        for run_id in self.children.values():
            self.client.set_terminated(run_id, status="FINISHED")
        self.client.set_terminated(self.parent, status=status)


def _params(config: dict, prefix: str = "") -> list:
    """The config as MLflow params, one per leaf (dotted path), values cut to MLflow's 6000 characters."""
    from mlflow.entities import Param

    params = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path != "tune.space":
            params += _params(value, f"{path}.")
        else:
            params.append(Param(path, str(value)[:6000]))
    return params
