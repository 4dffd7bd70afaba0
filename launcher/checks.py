"""The checks of a config against the world outside it, before Ray starts: the files and stages it
names, its run directory (empty, or for `--resume` the run it continues, started by raylaunch and
with the same config), an MLflow server that answers. `load_for_run` is what `raylaunch run`
starts from: the config's own problems and these, all in one pass."""

from __future__ import annotations

import os
from typing import Any

import yaml

from cluster.remote import is_empty_dir, is_uri, join, read_text
from launcher.config import ConfigError, _load, _section
from launcher.rundir import resume_problems
from runconfig.resolved import redacted
from runconfig.schema import (NOT_PT2E, STAGES, DataConfig, DistillConfig, ModelConfig, OutputConfig, RunConfig,
                              TrainConfig, searches_student, student_fits)

SKLEARN_DATASETS = ("sklearn:digits", "sklearn:breast_cancer", "sklearn:wine", "sklearn:iris")
LANGUAGE_MODELS = ("gpt", "hf")
FIXED_KIND = ("cnn", "mlp", "gpt", "hf")
"""The families made for one kind of data (a `python` model takes whatever its builder does)."""


def load_for_run(config_path: str | os.PathLike, overrides: list[str], stages: list[str] | None,
                 resume: bool = False) -> tuple[RunConfig, list[str]]:
    """What `raylaunch run` starts from: the validated config and the stages to run (`stages`, or
    the config's default), after every check that needs no cluster: the config's own, then the
    files, stages and run directory it names. Every problem of every layer is reported at once;
    the checks against the world go by the sections that are valid where another one is not."""
    cfg, raw, problems = _load(config_path, overrides, prepare=_keep_global_batch if resume else None)
    if stages is None and cfg is not None:
        stages = cfg.default_stages()
    problems += input_problems(cfg, raw, stages or [], resume)
    if problems:
        raise ConfigError(problems)
    return cfg, stages


def check_inputs(cfg: RunConfig, stages: list[str], resume: bool = False) -> None:
    """Checks against the world outside the config (files, run directory), still before Ray starts.
    With `resume`, the run directory must hold a run of this same config."""
    problems = input_problems(cfg, cfg.model_dump(mode="json"), stages, resume)
    if problems:
        raise ConfigError(problems)


def input_problems(cfg: RunConfig | None, raw: dict, stages: list[str], resume: bool = False) -> list[str]:
    """The files, stages and run directory a config names, checked as far as its valid sections go
    (`cfg` None: a config with problems of its own, whose sections are taken one by one from `raw`)."""
    def section(name: str):
        return getattr(cfg, name) if cfg is not None else _section(raw, name)

    data, model, tune, output = section("data"), section("model"), section("tune"), section("output")
    problems = _data_problems(data, model) if data is not None else []
    problems += _model_problems(model, data) if model is not None else []
    sweeps_student = tune is not None and tune.enabled and searches_student(tune.space)
    problems += stage_problems(stages, sweeps_student)
    distill = section("distill")
    if model is not None and distill is not None:
        runs = "distill" in stages or (sweeps_student and "tune" in stages)
        problems += _student_problems(model, distill, runs, data)
    quantize = section("quantize")
    if (model is not None and model.type in NOT_PT2E and quantize is not None and "methods" in quantize.model_fields_set
            and "static_int8" in quantize.methods):
        problems.append(f"quantize.methods: static_int8 (a PT2E export of the whole model) does not take model.type "
                        f"{model.type}; use int8_dynamic, int8_weight_only or int4_weight_only")
    if output is None:
        return problems
    out = output.dir
    problems += output_dir_problems(out)
    if isinstance(output.mlflow, str):
        problems += _mlflow_problems(output.mlflow)
    if not any(p.startswith("output.dir") for p in problems):
        if resume:
            problems += _resume_problems(cfg, out)
        elif not is_empty_dir(out):
            problems.append(
                f"output.dir: {out} already exists and is not empty; a run never overwrites another "
                f"(choose a new one with --set output.dir=..., or continue it with --resume)"
            )
    return problems


def output_dir_problems(out: str) -> list[str]:
    """An output.dir URI whose filesystem pyarrow cannot open (an unknown scheme, missing
    credentials or a bucket that is not there)."""
    if not is_uri(out):
        return []
    from cluster.remote import filesystem

    try:
        fs, path = filesystem(out)
        fs.get_file_info(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ValueError by scheme
        reason = " ".join(str(exc).split())[:300]
        return [f"output.dir: cannot open {out} ({reason}); use a URI pyarrow knows (s3://, gs://, hdfs://, file://) "
                f"with its credentials in the environment, or a path"]
    return []


def _mlflow_problems(uri: str) -> list[str]:
    """An MLflow tracking server that does not answer: said now, not after MLflow's minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return []
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
        return [f"output.mlflow: no MLflow tracking server answers at {uri} ({reason}); start it, fix the URI, or set "
                f"output.mlflow: true for a store in the run directory"]
    return []


def _data_problems(data: DataConfig, model: ModelConfig | None) -> list[str]:
    """The data section against the files it names: they exist, and the model fits the data's kind."""
    from dataprep import DataError
    from dataprep.sources import data_files, sources_of

    problems = []
    text = data.is_text
    if model is not None and model.type in FIXED_KIND and (model.type in LANGUAGE_MODELS) != text:
        problems.append("model.type: gpt and hf train on text (data.format: text, or a table's data.text_column) and text "
                        f"needs model.type gpt or hf; got model.type {model.type} with data.format {data.format}")
    if model is not None and model.task == "sequence_classification" and data.text_column is None:
        problems.append("model.task: sequence_classification gives each text a label: set data.text_column (and "
                        "data.label_column) to columns of a Parquet, CSV or JSONL table")
    if data.instructions is not None and model is not None:
        if model.type != "hf":
            problems.append(f"data.instructions: instruction data fine-tunes a transformers causal LM; set model.type: hf "
                            f"(got {model.type})")
        elif not (model.tokenizer or model.name_or_path):
            problems.append("model.tokenizer: instruction data is rendered and tokenized by the model's own tokenizer; "
                            "give model.name_or_path or model.tokenizer (a folder with tokenizer files)")
    tokenize = next((t for t in data.transforms if t.type == "tokenize"), None)
    if model is not None and model.type == "hf" and text and data.instructions is None:
        brings = model.tokenizer or model.name_or_path
        if brings and tokenize is not None and "tokenizer" in tokenize.model_fields_set:
            problems.append(f"data.transforms: tokenize sets tokenizer {tokenize.tokenizer}, but the model's own tokenizer "
                            f"({brings}) tokenizes its text; drop the option (or set model.tokenizer)")
        if not brings and (tokenize is None or tokenize.tokenizer != "bpe"):
            problems.append("model.tokenizer: a model built from model.hf_config needs a tokenizer: a folder in "
                            "model.tokenizer, or data.transforms [{type: tokenize, tokenizer: bpe}, pack] to train one")
    sources = sources_of(data.model_dump(mode="json"))
    bundled = [s for s in sources if s.startswith("sklearn:")]
    if bundled and (len(sources) > 1 or text):
        problems.append(f"data.source: a bundled dataset ({bundled[0]}) is read alone, not with other sources or as text")
    elif bundled and bundled[0] not in SKLEARN_DATASETS:
        problems.append(f"data.source: unknown bundled dataset {bundled[0]!r} (known: {', '.join(SKLEARN_DATASETS)})")
    elif not bundled:
        try:
            files = data_files(data.model_dump(mode="json"))
            if data.text_column is not None:
                problems += _text_table_problems(data, model, files)
            if data.instructions is not None:
                from dataprep.instructions import check_columns

                check_columns(data.model_dump(mode="json"), files)
        except DataError as exc:
            problems += exc.problems
    image_input = data.format == "images" or data.image_shape is not None or data.source == "sklearn:digits"
    if model is not None and model.type == "cnn" and not image_input:
        problems.append("model.type: cnn needs image input; set data.image_shape [channels, height, width], "
                        "use data.format images, or use model.type: mlp")
    return problems


def _text_table_problems(data: DataConfig, model: ModelConfig | None, files) -> list[str]:
    """A table's text column (and a classifier's label column) in its first file; a classifier's
    rows are not packed."""
    from dataprep.text_tables import check_columns, model_task, text_task

    dump = data.model_dump(mode="json")
    task = text_task(dump, model_task(model.model_dump(mode="json")) if model is not None else "auto", files)
    check_columns(dump, files, task)
    if task == "classify" and any(t.type == "pack" for t in data.transforms):
        return ["data.transforms: pack joins texts into blocks for a language model; a classifier reads each row's text "
                "on its own (truncated or padded to model.seq_len): use [tokenize]"]
    return []


def _model_problems(model: ModelConfig, data: DataConfig | None) -> list[str]:
    """A transformers model's folders: given as paths, they must hold what transformers loads. Your
    own model's builder and loss: they import, and the builder returns a module for this data."""
    if model.type == "python":
        return _user_code_problems(model, data)
    problems = []
    for field, needs in (("name_or_path", "config.json"), ("tokenizer", None)):
        where = getattr(model, field) if model.type == "hf" else None
        if where is None:
            continue
        if os.path.isdir(where):
            if needs and not os.path.isfile(os.path.join(where, needs)):
                problems.append(f"model.{field}: {where} has no {needs}; give a folder written by save_pretrained")
        elif os.path.exists(where) or not _looks_like_hub_id(where):
            problems.append(f"model.{field}: {where} is no folder (nor a hub id such as org/name); give a folder "
                            f"written by save_pretrained")
    config = os.path.join(model.name_or_path or "", "config.json")
    if model.type == "hf" and not model.trust_remote_code and os.path.isfile(config) and _brings_code(config):
        problems.append(f"model.trust_remote_code: {model.name_or_path} brings its own model code (auto_map in "
                        f"config.json), which runs only with model.trust_remote_code: true; set it if you trust that code")
    return problems


def _brings_code(config_json: str) -> bool:
    import json

    try:
        return "auto_map" in json.loads(open(config_json).read())
    except (OSError, ValueError):
        return False  # transformers says what is wrong with the file when it loads it


def _user_code_problems(model: ModelConfig, data: DataConfig | None) -> list[str]:
    """Imports the builder and loss and builds the model on the meta device (no memory), for the
    data's input shape and classes: a path that does not import or a builder that returns no module
    is said now, before Ray starts, not by every worker."""
    import torch

    from dataprep import DataError
    from dataprep.peek import peek_shape
    from trainers.models import build_model
    from trainers.models.python import UserCodeError, import_path

    try:
        if model.loss is not None:
            import_path(model.loss, "loss")
        import_path(model.builder, "builder")
    except UserCodeError as exc:
        return [str(exc)]
    if data is None:
        return []
    try:
        input_shape, num_classes = peek_shape(data.model_dump(mode="json"), model.seq_len)
    except DataError:
        return []  # the data section's own problems are reported by _data_problems
    try:
        with torch.device("meta"):
            build_model(model.model_dump(mode="json"), input_shape, num_classes)
    except UserCodeError as exc:
        return [str(exc)]
    except Exception as exc:  # the user's builder raised: its own message, with what it was given
        return [f"model.builder: {model.builder} raised {type(exc).__name__}: {exc} (building for input shape "
                f"{input_shape} and {num_classes} classes)"]
    return []


def _looks_like_hub_id(name: str) -> bool:
    """`name` or `org/name`, as the hub spells them (a path like ./x, /x or a/b/c is a folder)."""
    parts = name.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") and p == p.strip() for p in parts)


def _student_problems(model: ModelConfig, distill: DistillConfig, runs: bool, data: DataConfig | None) -> list[str]:
    """A student that cannot learn from this teacher: a transformers teacher and student go
    together (they share the tokenizer); a derived student's overrides and initialization; a
    student's own tokenizer must be the teacher's. `runs`: the distill stage (or a sweep of
    students) is among the stages."""
    student = distill.student
    fields = distill.model_fields_set
    wanted = runs or (distill.enabled and ("enabled" in fields or "student" in fields))
    if not student_fits(model, student) and wanted:
        if model.type == "hf":
            return [f"distill.student: a transformers teacher distils into a transformers student that shares its "
                    f"tokenizer (got type {student.type}); set distill.student: {{type: hf, overrides: {{num_hidden_layers: "
                    f"2}}}}, or distill.enabled: false"]
        return [f"distill.student.type: a transformers student learns from a transformers teacher, whose tokenizer it "
                f"shares (got model.type {model.type}); choose a student of type {model.type}"]
    if not runs:
        return []
    problems = []
    if model.type in LANGUAGE_MODELS and "seq_len" in student.model_fields_set and student.seq_len != model.seq_len:
        problems.append(f"distill.student.seq_len: the student reads the teacher's rows of {model.seq_len} tokens; drop it "
                        f"(it follows model.seq_len)")
    if student.type != "hf":
        return problems
    if student.overrides is not None:
        return problems + _derived_student_problems(model, student)
    problems += [p.replace("model.", "distill.student.", 1) for p in _model_problems(student, data)]
    return problems or _tokenizer_problems(model, student)


def _derived_student_problems(model: ModelConfig, student: ModelConfig) -> list[str]:
    """The teacher's config takes the overrides; a student asked to start from the teacher's
    layers can (both models built on the meta device)."""
    from trainers.models.hf import hf_config
    from trainers.models.hf_student import init_refusal, layer_init_problem, student_config

    try:
        teacher = hf_config(model.model_dump(mode="json"), 0)
    except Exception:  # the model section's own problem, said where the teacher is built
        return []
    try:
        derived = student_config(teacher, student.overrides)
    except ValueError as exc:
        return [str(exc)]
    if student.init == "teacher_layers":
        problem = layer_init_problem(teacher, derived, model.trust_remote_code)
        if problem:
            return [init_refusal(problem)]
    return []


def _tokenizer_problems(model: ModelConfig, student: ModelConfig) -> list[str]:
    """A student that brings a tokenizer must bring the teacher's: it learns from the teacher's
    outputs over the teacher's token ids."""
    field = "tokenizer" if student.tokenizer else "name_or_path"
    brings = student.tokenizer or (student.name_or_path if student.hf_config is None else None)
    if brings is None:  # built from hf_config on the data's tokenizer: the teacher's
        return []
    teacher = model.tokenizer or model.name_or_path
    if teacher is None:
        return [f"distill.student.{field}: the teacher's tokenizer is trained on the data (data.transforms tokenize "
                f"bpe) and {brings} brings its own; build the student from distill.student.overrides or hf_config"]
    from trainers.models.hf_student import tokenizer_difference

    try:
        difference = tokenizer_difference(teacher, brings, model.trust_remote_code or student.trust_remote_code)
    except (OSError, ValueError) as exc:
        return [f"distill.student.{field}: no tokenizer loads from {brings} ({' '.join(str(exc).split())[:200]}); give "
                f"a folder with the teacher's tokenizer files"]
    if difference:
        return [f"distill.student.{field}: the tokenizer of {brings} is not the teacher's ({difference}); teacher and "
                f"student must share one: use a student made with {teacher}'s tokenizer, or derive one from the teacher "
                f"with distill.student.overrides"]
    return []


def _keep_global_batch(raw: dict) -> list[str]:
    """A resume on another worker count (`--set train.workers=N`) keeps the run's global batch: the
    gradient accumulation that does so is set in `raw`, or, where no whole one does, the problem."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    output = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    text = read_text(join(str(output.get("dir", OutputConfig.model_fields["dir"].default)), "config.yaml"))
    saved = ((yaml.safe_load(text) or {}) if text else {}).get("train") or {}
    defaults = TrainConfig.model_fields
    given = train.get("workers", defaults["workers"].default)
    micro = train.get("micro_batch_size", defaults["micro_batch_size"].default)
    # A range's largest count takes a step's micro batches one each (the schema checks the rest).
    workers = max(given) if isinstance(given, list) and given and all(isinstance(n, int) for n in given) else given
    if (not isinstance(workers, int) or workers < 1 or not {"workers", "grad_accum_steps"} <= saved.keys()
            or given == saved["workers"] or micro != saved.get("micro_batch_size")):
        return []  # the same count, or a change the comparison with the saved config refuses
    slots = _slots(saved)  # micro batches per optimizer step
    if slots % workers:
        counts = [str(n) for n in range(1, slots + 1) if slots % n == 0]
        return [f"train.workers: the run's global batch is {slots} micro batches of {micro} rows, which {workers} "
                f"workers cannot share evenly; resume on {', '.join(counts[:-1])} or {counts[-1]} workers"
                if len(counts) > 1 else
                f"train.workers: the run's global batch is one micro batch of {micro} rows, which only 1 worker "
                f"can train; resume on 1 worker"]
    raw.setdefault("train", {})["grad_accum_steps"] = slots // workers
    return []


def _slots(train: dict) -> int:
    """Micro batches per optimizer step of a saved config's train section."""
    workers = train.get("workers", 0)
    return (max(workers) if isinstance(workers, list) else workers) * train.get("grad_accum_steps", 0)


def _resume_problems(cfg: RunConfig | None, out: str) -> list[str]:
    saved = join(out, "config.yaml")  # a path or a URI
    text = read_text(saved)
    if text is None:
        return [f"--resume: {out} holds no run to resume (no config.yaml); run without --resume to start one"]
    problems = resume_problems(out)
    if problems or cfg is None:
        return problems
    before = yaml.safe_load(text) or {}
    now = redacted(cfg.model_dump(mode="json"))  # as config.yaml keeps it
    # data.in_memory says how, not what, to read; the pipeline refuses a resume that would read
    # the interrupted stage's splits otherwise than it did. config.yaml holds the ZeRO stage `auto`
    # was resolved to, which a resumed run given `auto` keeps.
    # The worker count may change where the global batch stays (`_keep_global_batch`).
    train_before = before.get("train") or {}
    same_batch = _slots(train_before) == cfg.train.slots
    differences = [d for d in _differences(before, now) if d[0] != "data.in_memory"
                   and not (d[0] == "train.zero.stage" and d[2] == "auto" and isinstance(d[1], int))
                   and not (same_batch and d[0] in ("train.workers", "train.grad_accum_steps"))]
    return [f"--resume: {path} was {old!r} in {saved} but is {new!r} now; a resumed run keeps its config"
            for path, old, new in differences]


def _differences(before: Any, now: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in sorted(set(before) | set(now), key=str)
                for d in _differences(before.get(key), now.get(key), f"{path}.{key}" if path else str(key))]
    return [] if before == now else [(path, before, now)]


def stage_problems(stages: list[str], sweeps_student: bool = False) -> list[str]:
    """What is wrong with a `--stages` list: names that are no stage, and an order that cannot run."""
    problems = [f"--stages: unknown stage {name!r} (stages: {', '.join(STAGES)})" for name in stages if name not in STAGES]
    return problems + _stage_order_problems([s for s in stages if s in STAGES], sweeps_student)


def _stage_order_problems(stages: list[str], sweeps_student: bool = False) -> list[str]:
    needs = {
        "train": ("preprocess",),
        "tune": ("train",) if sweeps_student else ("preprocess",),
        "distill": ("train", "tune"),
        "quantize": ("distill", "train", "tune"),
        "evaluate": ("train", "tune"),
    }
    problems = []
    if sweeps_student and "distill" in stages:
        problems.append("--stages: tune.space searches distill paths, so the tune stage distills the student; leave "
                        "distill out")
    if stages and stages[0] != "preprocess":
        problems.append("--stages: must start with preprocess (continuing an existing run directory is not supported yet)")
    for i, stage in enumerate(stages):
        if stage in stages[:i]:
            problems.append(f"--stages: {stage} is listed twice")
        earlier = stages[:i]
        if stage in needs and not any(n in earlier for n in needs[stage]):
            problems.append(f"--stages: {stage} needs {' or '.join(needs[stage])} before it")
    if [s for s in STAGES if s in stages] != stages:
        problems.append(f"--stages: stages run in the order {', '.join(STAGES)}")
    return problems
