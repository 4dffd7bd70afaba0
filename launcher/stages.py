"""The stages: each a function of the run (`launcher.rundir.Run`: its config, folders, console and
record) and the typed results of the stages before it, returning its own typed result. A result's
`record` is what summary.json keeps of the stage (`launcher.report.stage_line` prints it as one
line); `launcher.pipeline` runs the stages in order, and restores those an interrupted run finished
from their records.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cluster.raycompat import CHECKPOINT_SNAPSHOT, latest_checkpoint_metrics, registered_checkpoints
from cluster.remote import fetch, join, read_text, remove_dirs, staging_dir
from dataprep.meta import DataMeta
from launcher.config import ConfigError, dump_yaml
from launcher.report import write_summary
from launcher.rundir import Run
from runconfig.schema import RunConfig

# The model each training stage leaves in models/<role>/ (a sweep's role is in its record: a sweep
# of distill paths makes the student).
_ROLES = {"train": "teacher", "distill": "student"}


class _Result:
    def models_record(self) -> dict:
        """What summary.json's `models` gains from this stage, by model name."""
        return {}


@dataclass(frozen=True)
class Prepared(_Result):
    """preprocess: the cache entry holding the splits, and what they hold."""

    data_dir: Path
    meta: DataMeta
    record: dict


@dataclass(frozen=True)
class Trained(_Result):
    """train, tune or distill: the model it left in models/<role>/."""

    role: str
    model_dir: Path
    record: dict

    @classmethod
    def restored(cls, run_dir: Path, name: str, record: dict) -> Trained:
        role = record.get("role", "teacher") if name == "tune" else _ROLES[name]
        return cls(role, run_dir / "models" / role, record)

    def dirs(self) -> dict[str, Path]:
        return {self.role: self.model_dir}


@dataclass(frozen=True)
class Models:
    """The fp32 models the training stages made so far: the teacher, and the student if distilled."""

    teacher: Trained | None = None
    student: Trained | None = None

    def __add__(self, trained: Trained | None) -> Models:
        if trained is None:  # a stage this run does not take
            return self
        return Models(**{"teacher": self.teacher, "student": self.student, trained.role: trained})

    @property
    def final(self) -> Trained:
        """The model the run ships: the student where there is one."""
        return self.student or self.teacher

    def dirs(self) -> dict[str, Path]:
        return {m.role: m.model_dir for m in (self.teacher, self.student) if m is not None}


@dataclass(frozen=True)
class Quantized(_Result):
    """quantize: each method's model of the final model, with the gate's verdict on it."""

    source: str
    gated: dict[str, dict]
    """By model name: method, status (accepted or rejected), drop, test quality, path."""
    record: dict
    test_metrics: dict[str, dict] = field(default_factory=dict)
    """The test-split metrics this run measured for the gate (the source's and each model's), by name."""

    @classmethod
    def restored(cls, run_dir: Path, name: str, record: dict) -> Quantized:
        return cls(record["source"], record["models"], record)

    def dirs(self) -> dict[str, Path]:
        return {name: Path(m["path"]) for name, m in self.gated.items()}

    def models_record(self) -> dict:
        return {name: dict(m) for name, m in self.gated.items()}


@dataclass(frozen=True)
class Evaluated(_Result):
    """evaluate: every model's quality, size and speed (summary.json's `models`)."""

    models: dict[str, dict]
    record: dict = field(default_factory=dict)

    def models_record(self) -> dict:
        return self.models


# The stages whose result a resumed run keeps (preprocessing and evaluation always run again:
# the first finds its cache entry, or rebuilds one that was removed).
RESTORED = {"train": Trained, "tune": Trained, "distill": Trained, "quantize": Quantized}


def preprocess(run: Run) -> Prepared:
    from dataprep.cache import prepare
    from dataprep.text import HfTokenizer
    from dataprep.text_tables import model_task

    data = run.resolved.dump()["data"]
    bar = run.live.bar("rows written", None)

    def progress(rows: int, expected: int | None) -> None:
        run.live.update(bar, completed=rows, total=expected)

    model = run.resolved.dump()["model"]
    meta, data_dir, reused = prepare(data, run.cfg.model.seq_len, run.cache_root, progress, HfTokenizer.for_model(model),
                                     model_task(model), packs_examples(data, model))
    (run.run_dir / "data.json").write_text(json.dumps({"path": str(data_dir), "key": meta["cache_key"]}, indent=1))
    record = {"rows": meta["rows"], "cache": {"path": str(data_dir), "key": meta["cache_key"], "reused": reused},
              "bad_rows": meta.get("bad_rows", {}), "files": meta["files"]}
    if meta["task"] == "lm":
        record |= {"tokens": meta["tokens"], "tokenizer": meta["tokenizer"], "seq_len": meta["seq_len"]}
    if "instructions" in meta:
        record["packed"] = meta["instructions"]["packed"]
    else:
        record |= {"num_classes": meta["num_classes"], "input_shape": meta["input_shape"]}
    return Prepared(data_dir, meta, record)


def packs_examples(data: dict, model: dict) -> bool:
    """data.pack where the model keeps packed examples apart (else one example a row, padded)."""
    if not data["pack"] or model["type"] != "hf":
        return False
    from trainers.models.hf import separates_packed

    return separates_packed(model)


def train(run: Run, data: Prepared) -> Trained:
    from trainers.worker import worker_config

    config = worker_config(run.resolved, data.meta)
    (run.run_dir / "deepspeed.json").write_text(json.dumps(config.deepspeed, indent=1))
    resumed = resume_point(run, "train")
    return _trained(run, data, "train", config, _splits(run, data, "train"), resumed)


def tune(run: Run, data: Prepared, teacher: Trained | None) -> Trained:
    """The sweep: of the teacher's training, or (distill paths in its space) of distilling `teacher`."""
    from launcher.live import SweepProgress
    from launcher.report import print_trials
    from trainers.fit import splits_in_memory
    from tuning.packing import pack, trial_count
    from tuning.results import write_trials
    from tuning.space import max_epochs
    from tuning.sweep import run_sweep

    cfg = run.cfg
    packing = pack(cfg, run.resources)
    concurrent = packing.concurrent
    run.console.print(f"  sweep: {packing.line(cfg)}")
    dump = run.resolved.dump()
    (run.run_dir / "tune").mkdir(exist_ok=True)
    # Every trial of a sweep of distill paths distills the trained teacher; precomputed, its
    # outputs are computed once for all of them.
    role, teacher_dir, train_dir = ("student" if cfg.sweeps_student else "teacher"), None, None
    if role == "student":
        teacher_dir = run.shared(teacher.model_dir)
        if cfg.distill.teacher_outputs == "precompute":
            train_dir = _precompute_teacher_outputs(run, data, teacher)["path"]
    # One read serves every trial; held in memory, each running trial cuts its ranks' shards from it.
    datasets = _splits(run, data, "tune", train_dir, trainers=concurrent)
    progress = SweepProgress(run.live, trial_count(cfg), max_epochs(dump, dump["tune"]["space"]), cfg.tune.metric)
    sweep = run_sweep(run.resolved, data.meta, datasets, run.storage, concurrent, run.run_dir / "tune" / "reports.jsonl",
                      resume=run.resume, teacher_dir=teacher_dir, callbacks=[progress])
    model_dir = keep_model(sweep.best_checkpoint, run.run_dir / "models" / role, data.data_dir)
    files = write_trials(sweep.trials, run.run_dir / "tune", cfg.tune.metric, dump["tune"]["space"])
    # The winner's whole config: `raylaunch run tune/best_config.yaml` trains it again without a sweep.
    best = run.resolved.with_overrides(sweep.best_values).run
    best.tune.enabled = False
    (run.run_dir / "tune" / "best_config.yaml").write_text(dump_yaml(best))
    files["best_config"] = str(run.run_dir / "tune" / "best_config.yaml")
    print_trials(run.console, sweep.trials, cfg.tune.metric, list(cfg.tune.space))
    record = {"role": role, "trials": sweep.trials, "best_trial": sweep.best_trial, "best_values": sweep.best_values,
              "best_metrics": sweep.best_metrics, "concurrent_trials": concurrent, **files,
              "data_in_memory": splits_in_memory(datasets),
              "cpu_hours": round(sum(t["cpu_hours"] for t in sweep.trials), 4),
              "gpu_hours": round(sum(t["gpu_hours"] for t in sweep.trials), 4)}
    if progress.events:  # the trials' restores, resizes and preemptions
        record["events"] = progress.events
    return Trained(role, model_dir, record)


def distill(run: Run, data: Prepared, teacher: Trained) -> Trained:
    from trainers.worker import worker_config

    config = worker_config(run.resolved, data.meta, teacher_dir=run.shared(teacher.model_dir))
    resumed = resume_point(run, "distill")
    precomputed = (_precompute_teacher_outputs(run, data, teacher) if run.cfg.distill.teacher_outputs == "precompute"
                   else {})
    splits = _splits(run, data, "distill", precomputed.get("path"))
    return _trained(run, data, "distill", config, splits, resumed | ({"teacher_outputs": precomputed} if precomputed else {}))


def quantize(run: Run, data: Prepared, source: Trained) -> Quantized:
    """Each method's quantized model of the final fp32 model, exported, then gated: one that loses
    more than `quantize.max_drop` on the test split fails the stage and is kept, marked rejected
    (`QuantizationRejected` carries the verdicts for the summary)."""
    from trainers.evaluate import first_rows, test_metrics
    from trainers.modeldir import load_model, quantize_model_dir
    from runconfig.schema import NOT_PT2E
    from trainers.quantize import gate, rejection, unsupported_reason

    q = run.cfg.quantize
    test_dir = data.data_dir / "test"
    measured = {source.role: test_metrics(load_model(source.model_dir)[0], test_dir, data.meta)}
    baseline = measured[source.role]
    # Rows of the validation split: static_int8 calibrates on them, and every export is checked
    # to reproduce its quantized model on them.
    calibration = first_rows(data.data_dir / "val", data.meta, q.calibration_rows)
    made, skipped = {}, {}
    # The default methods hold static_int8, which these families do not take (asked for, it is refused).
    methods = [m for m in q.methods if not (m == "static_int8" and run.cfg.model.type in NOT_PT2E)]
    for method in methods:
        reason = unsupported_reason(method)
        if reason:
            skipped[method] = reason
            run.console.print(f"  [yellow]{method} skipped[/]: {reason}")
            continue
        name = f"{source.role}-{method}"
        target = run.run_dir / "models" / name
        quantize_model_dir(source.model_dir, target, method, calibration, compile=q.compile)
        model, spec = load_model(target, compiled=True)  # this run compiled it: its gate measures what ships
        if spec.get("not_compiled"):
            run.console.print(f"  [yellow]{name} not compiled[/]: {escape(spec['not_compiled'])}")
        metrics = measured[name] = test_metrics(model, test_dir, data.meta)
        status, drop = gate(baseline, metrics, q.max_drop)
        made[name] = {"method": method, "status": status, "drop": drop, "path": str(target),
                      **{k: metrics[k] for k in ("accuracy", "perplexity") if k in metrics},
                      **({"not_compiled": spec["not_compiled"]} if spec.get("not_compiled") else {})}
    refused = rejection(source.role, baseline, made, q.max_drop)
    if refused is not None:
        raise refused
    quality = "perplexity" if "perplexity" in baseline else "accuracy"
    record = {"source": source.role, "baseline": {quality: baseline[quality]}, "models": made, "skipped": skipped}
    return Quantized(source.role, made, record, measured)


def evaluate(run: Run, data: Prepared, models: Models, quantized: Quantized | None) -> Evaluated:
    from trainers.evaluate import GEN_BATCHES, first_rows, generation_speed, interleaved_latency, measure, test_metrics
    from trainers.modeldir import load_model

    directories = models.dirs() | (quantized.dirs() if quantized else {})
    measured = quantized.test_metrics if quantized else {}
    gated = quantized.gated if quantized else {}
    test_dir = data.data_dir / "test"
    example = first_rows(test_dir, data.meta, 1)
    # Every model here was made by this run: a compiled program among them is its own.
    loaded = {name: load_model(directory, compiled=True) for name, directory in directories.items()}
    timings = interleaved_latency({name: model for name, (model, _) in loaded.items()}, example)
    if data.meta["task"] == "lm":  # and how fast each language model writes
        speeds = generation_speed({name: model for name, (model, _) in loaded.items()},
                                  first_rows(test_dir, data.meta, max(GEN_BATCHES)))
        timings = {name: timings[name] | speeds[name] for name in timings}
    numbers = {}
    for name, directory in directories.items():
        model, spec = loaded[name]
        # The quantize stage of this run measured the final model and its quantized ones on the test split.
        quality = measured.get(name) or test_metrics(model, test_dir, data.meta)
        verdict = {k: v for k, v in gated.get(name, {}).items() if k in ("method", "status", "drop")}
        # What ran: a compiled program (its file) or, where it cannot run here, the reference program and why.
        program = {"program": spec["program"]} if "program" in spec else {}
        if "compiled" in spec:
            program["program_bytes"] = spec["compiled"]["bytes"]
        numbers[name] = {**measure(spec, directory, quality, timings[name]), **verdict, **program,
                         "path": str(directory)}
    return Evaluated(numbers)


# ---------------------------------------------------------------------------------------------
# What the training stages share.


def _trained(run: Run, data: Prepared, name: str, config, splits: dict, extra: dict) -> Trained:
    """A train or distill stage's run (of a `trainers.worker.WorkerConfig`), its best checkpoint's
    model copied to models/<role>/, and its record (with `extra`)."""
    from trainers.fit import best_checkpoint, build_trainer, fit, splits_in_memory

    from cluster.raycompat import ReportStream

    role = _ROLES[name]
    bar = run.live.training(role, config.total_steps, config.train.epochs)
    with ReportStream(bar) as reports:
        result = fit(build_trainer(config, splits, run.storage, name=name, callbacks=[reports.callback()]), config.train)
    checkpoint, metrics = best_checkpoint(result, config.metric)
    model_dir = keep_model(checkpoint, run.run_dir / "models" / role, data.data_dir)
    record = _training_record(metrics, run.cfg) | extra | {"data_in_memory": splits_in_memory(splits)}
    if bar.events:  # restores, resizes and preemptions, with their steps
        record["events"] = bar.events
    return Trained(role, model_dir, record)


def _splits(run: Run, data: Prepared, stage: str, train_dir: str | None = None, trainers: int = 1) -> dict:
    """The train and val splits for a training stage, held in memory as `data.in_memory` says
    (`trainers`: the training runs at once that cut shards from them). How they are read decides
    which rows each rank trains on: it is recorded before training starts, and a resume that would
    read them the other way (`auto` deciding otherwise on another machine) is refused."""
    from trainers.fit import load_splits, splits_in_memory

    splits = load_splits(data.data_dir, run.cfg.data.in_memory, run.cfg.data.ingest_memory_mb, train_dir, trainers)
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


def _precompute_teacher_outputs(run: Run, data: Prepared, teacher: Trained) -> dict:
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
    top_k = run.cfg.distill.top_k
    rows = precompute_teacher_outputs(run.shared(teacher.model_dir), data.data_dir, target, data.meta, top_k, actors)
    seconds = time.perf_counter() - started
    what = f"top {top_k} logits per token" if data.meta["task"] == "lm" else "logits"
    run.console.print(f"  teacher outputs: {what} for {rows:,} train rows by {actors} actor(s) in {seconds:.1f} s")
    return {"path": str(target), "rows": rows, "actors": actors, "seconds": round(seconds, 1)}


def resume_point(run: Run, name: str) -> dict:
    """Where a resumed training run continues: the step of the latest checkpoint Ray Train kept
    for it (read from its checkpoint manager's snapshot: cluster.raycompat, 4)."""
    return _resume_point(run.storage, name, run.console) if run.resume else {}


def _resume_point(storage: Path | str, name: str, console: Console) -> dict:
    experiment = join(str(storage), name)
    text = read_text(join(experiment, CHECKPOINT_SNAPSHOT))
    if text is None:
        return {}
    # A driver killed while its workers were uploading a checkpoint leaves that folder behind,
    # possibly half written, which Ray Train never registered and will never read: remove it.
    registered = registered_checkpoints(text)
    if registered is None:
        console.print(f"  [yellow]{name}: Ray Train's checkpoint snapshot is not in the form raylaunch knows; "
                      f"every checkpoint folder is kept[/]")
        return {}
    dropped = remove_dirs(experiment, "checkpoint_", keep=registered)
    if dropped:
        console.print(f"  {name}: removed {len(dropped)} unregistered checkpoint folder(s) the interrupted run "
                      f"left half written: {', '.join(dropped)}")
    latest = latest_checkpoint_metrics(text)
    if "step" not in latest:
        return {}
    console.print(f"  {name}: continuing from the checkpoint at step {latest['step']} (epoch {latest['epoch']:.2f})")
    return {"resumed_from_step": latest["step"]}


def keep_model(checkpoint: str, target: Path, data_dir: Path) -> Path:
    """Copy a checkpoint's consolidated model (not its DeepSpeed training state) out of Ray's
    storage (a path or a URI) into the run's models/ folder; the folder appears complete or not at all."""
    from dataprep import TOKENIZER_DIR, TOKENIZER_FILE
    from trainers.modeldir import SPEC, export_adapter, model_files

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fetch(checkpoint, (SPEC,), tmp)
    fetch(checkpoint, tuple(model_files(json.loads((tmp / SPEC).read_text()))), tmp)
    # A model carries its tokenizer (`raylaunch predict` needs it): a BPE's file, or a transformers
    # model's tokenizer folder's files beside its weights, where transformers looks for them.
    tokenizer = data_dir / TOKENIZER_FILE
    if tokenizer.exists():
        shutil.copy2(tokenizer, tmp / TOKENIZER_FILE)
    for file in sorted((data_dir / TOKENIZER_DIR).glob("*")):
        shutil.copy2(file, tmp / file.name)
    export_adapter(tmp)  # LoRA: the adapter merged into the base model, and kept beside it
    # A driver killed after an earlier copy and before the summary recorded its stage left one:
    # the stage ran again, and its model replaces it.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _training_record(metrics: dict, cfg: RunConfig) -> dict:
    """What the summary keeps of a training stage: the best checkpoint's metrics, where it ran."""
    keys = ("epoch", "step", "val_accuracy", "val_loss", "val_perplexity", "train_loss", "samples_per_s", "tokens_per_s")
    kept = {k: metrics[k] for k in keys if k in metrics}
    return {**kept, "zero_stage": cfg.train.zero.stage, "workers": cfg.train.workers}
