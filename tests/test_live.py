"""The metric logs without a cluster: what a report writes, and a log that fails or cannot start."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from cluster.session import free_port
from launcher.checks import check_inputs
from launcher.config import ConfigError, load
from launcher.live import Live

REPORT = {"step": 3, "epoch": 1.0, "val_accuracy": 0.5, "val_loss": 1.2, "train_loss": 1.4, "samples_per_s": 900.0,
          "step_log": [[1, 2.0, 0.1], [2, 1.5, 0.1], [3, 1.0, 0.1]], "checkpoint_path": "/x"}


def test_a_report_goes_to_tensorboard_and_the_metrics_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    live = Live(tmp_path, Console(file=open(tmp_path / "console", "w")), tensorboard=True, mlflow=False, params={})
    live.report("teacher", REPORT)
    live.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "teacher")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val/accuracy")] == [(3, 0.5)]
    kept = json.loads((tmp_path / "metrics" / "teacher.jsonl").read_text())
    assert kept == {k: v for k, v in REPORT.items() if k != "checkpoint_path"}


def test_a_failing_metric_log_is_said_once_and_training_goes_on(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the event folders would go")
    console = tmp_path / "console"
    live = Live(tmp_path, Console(file=open(console, "w"), width=200), tensorboard=True, mlflow=False, params={})
    live.report("teacher", REPORT)
    live.report("teacher", REPORT | {"step": 6})  # not tried again, not raised
    live.close()
    said = console.read_text().strip().splitlines()
    assert len(said) == 1 and said[0].startswith("TensorBoard logging stopped: ") and "TensorBoard" in live.failed
    assert len((tmp_path / "metrics" / "teacher.jsonl").read_text().splitlines()) == 2  # the history still kept


def test_an_mlflow_server_that_does_not_answer_is_one_line_before_the_run(tmp_path):
    port = free_port()  # nobody listens there
    cfg = load(Path(__file__).parent.parent / "configs" / "quickstart.yaml", [f"output.dir={tmp_path / 'run'}", f"output.mlflow=http://127.0.0.1:{port}"])
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        check_inputs(cfg, ["preprocess"])
    assert time.monotonic() - started < 10
    assert refused.value.problems == [f"output.mlflow: no MLflow tracking server answers at http://127.0.0.1:{port} "
                                      f"(connection refused); start it, fix the URI, or set output.mlflow: true for a "
                                      f"store in the run directory"]


def test_a_resumed_sweeps_callback_shows_on_the_resuming_drivers_display(tmp_path):
    """Tune pickles its callbacks into the experiment state, and `Tuner.restore` unpickles them in
    the driver that resumes the sweep: the bars come back where they were, on that driver's display,
    and the trials' reports reach its metric logs."""
    import pickle
    from types import SimpleNamespace

    from launcher.live import SweepProgress

    def live(name: str) -> Live:
        (tmp_path / name).mkdir()
        return Live(tmp_path / name, Console(file=open(tmp_path / f"{name}.console", "w")), tensorboard=False,
                    mlflow=False, params={})

    first = live("first")
    with first.stage("tune"):
        progress = SweepProgress(first, trials=3, epochs_per_trial=4, metric="val_accuracy")
        progress.on_trial_result(0, [], SimpleNamespace(trial_id="t1"), {"epoch": 2.0, "val_accuracy": 0.5, "step": 2})
        progress.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))  # stopped early: 2 of its 4 epochs
        state = pickle.dumps(progress)
    first.close()
    second = live("second")
    with second.stage("tune"):
        restored = pickle.loads(state)
        bars = {t.description: t for t in second.progress.tasks}
        assert (bars["trials done"].completed, bars["trials done"].total) == (1, 3)
        assert (bars["trial epochs"].completed, bars["trial epochs"].total) == (2, 10)
        restored.on_trial_result(0, [], SimpleNamespace(trial_id="t2"), {"epoch": 1.0, "val_accuracy": 0.7, "step": 1})
        assert bars["trial epochs"].completed == 3 and "best val_accuracy 0.7000" in bars["trial epochs"].fields["info"]
    second.close()
    assert (tmp_path / "second" / "metrics" / "trial-t2.jsonl").is_file()


def test_reports_tell_restores_resizes_and_preemptions_with_their_steps():
    from launcher.live import event_line, training_events
    from launcher.report import event_rows

    assert training_events({"step": 4, "workers": 2}, None) == []
    restored = {"step": 8, "workers": 2, "saved_on": 2, "lost_steps": 3}
    assert training_events({"step": 10, "workers": 2, "restored": restored}, 2) == [
        {"kind": "restore", "step": 8, "workers": 2, "lost_steps": 3}]
    resized = training_events({"step": 12, "workers": 1, "restored": {**restored, "workers": 1, "lost_steps": None}}, 2)
    assert resized == [{"kind": "resize", "step": 8, "workers": 1, "lost_steps": None}]
    notice = {"nodes": ["n1"], "ranks": [1], "deadline_ms": 10_000, "noticed_ms": 2_500}
    preempted = training_events({"step": 14, "workers": 2, "preemption": notice}, 2)
    assert preempted == [{"kind": "preemption", "step": 14, "ranks": [1], "seconds_left": 7.5}]
    assert event_line(resized[0]) == "resized to 1 worker(s), going on from step 8 (steps lost unknown)"
    assert event_line(preempted[0]) == "preemption of rank(s) [1] noticed: checkpoint at step 14, 7.5 s before its deadline"
    stages = {"preprocess": {"rows": {}}, "train": {"events": [*resized, *preempted]}}
    assert event_rows(stages) == [
        ["train", "resize", 8, 1, "unknown", "continued from the checkpoint at this step"],
        ["train", "preemption checkpoint", 14, "", "", "rank(s) [1] noticed, 7.5 s before the deadline"]]


def test_the_report_has_a_table_of_worker_group_events(tmp_path):
    from launcher.report import write_report

    events = [{"kind": "preemption", "step": 40, "ranks": [1], "seconds_left": 6.5},
              {"kind": "restore", "step": 40, "workers": 2, "lost_steps": 0}]
    summary = {"status": "succeeded", "models": {}, "stages": {
        "train": {"seconds": 12.0, "val_accuracy": 0.9, "zero_stage": 2, "workers": 2, "events": events}}}
    markdown, html = write_report(tmp_path, summary)
    text = markdown.read_text()
    assert "## Worker group events" in text
    assert "| train | preemption checkpoint | 40 |  |  | rank(s) [1] noticed, 6.5 s before the deadline |" in text
    assert "| train | restore | 40 | 2 | 0 | continued from the checkpoint at this step |" in text
    page = html.read_text()
    assert "<h2>Worker group events</h2>" in page and "preemption checkpoint" in page


def test_a_sweep_records_each_trials_restores_with_the_trial():
    from types import SimpleNamespace

    from launcher.live import SweepProgress
    from launcher.report import event_rows

    progress = SweepProgress(None, trials=2, epochs_per_trial=2, metric="val_accuracy")
    trial = SimpleNamespace(trial_id="a1")
    progress.on_trial_result(0, [], trial, {"step": 4, "workers": 2, "val_accuracy": 0.5})
    restored = {"step": 4, "workers": 1, "saved_on": 2, "lost_steps": 1}
    progress.on_trial_result(1, [], trial, {"step": 8, "workers": 1, "restored": restored, "val_accuracy": 0.6})
    assert progress.events == [{"kind": "resize", "step": 4, "workers": 1, "lost_steps": 1, "trial": "a1"}]
    assert event_rows({"tune": {"events": progress.events}}) == [
        ["tune", "resize", 4, 1, 1, "trial a1: continued from the checkpoint at this step"]]
