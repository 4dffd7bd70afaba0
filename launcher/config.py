"""Loading a run configuration: the YAML file (a key given twice is refused), `--set` overrides,
validation against the schema (`runconfig.schema`) with the user's DeepSpeed JSON merged and the
search space checked, every problem as one `dotted.path: problem` line of a `ConfigError`.
(The checks against the world outside the config are `launcher.checks`.)
"""

from __future__ import annotations

import copy
import os
import types
import typing
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runconfig.problems import BadInput
from runconfig.resolved import redacted
from runconfig.schema import PBT_MUTABLE, TRANSFORM_TYPES, RunConfig, metric_mode, searches_student

TUNABLE_SECTIONS = ("model", "train", "distill")


class ConfigError(BadInput):
    """A config, override or input problem; each entry of `problems` is one `path: message` line."""


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _format_error(error: dict) -> str:
    path = _loc_path(error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "union_tag_invalid":
        message = f"unknown type {error['ctx']['tag']!r} (known: {error['ctx']['expected_tags']})"
    elif kind == "union_tag_not_found":
        message = "needs a type (a name, or a mapping with `type:`)"
    elif kind == "value_error":
        # Cross-field validators name the field they blame as "field: message".
        message = message.removeprefix("Value error, ")
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            path, message = f"{path}.{field}" if path else field, rest
    elif message.startswith("Input should be"):
        message = "must be" + message.removeprefix("Input should be")
    if kind not in ("extra_forbidden", "missing", "value_error") and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}" if path else message


def _loc_path(loc: tuple) -> str:
    """`data.transforms[0].size` from pydantic's ('data', 'transforms', 0, 'resize', 'size'): list
    indices in brackets, the tag pydantic adds after a discriminated union's index left out."""
    path, after_index = "", False
    for part in loc:
        if isinstance(part, int):
            path, after_index = f"{path}[{part}]", True
            continue
        if not str(part).startswith("function-after") and not (after_index and part in TRANSFORM_TYPES):
            key = _shown_key(part)
            path = f"{path}.{key}" if path else key
        after_index = False
    return path


def _shown_path(parts: list[str]) -> str:
    return ".".join(_shown_key(p) for p in parts)


def _shown_key(key) -> str:
    """A key as a problem line shows it: quoted when it is empty or has spaces or control characters
    (a key `\r` would otherwise print as nothing at all)."""
    text = str(key)
    return text if re.fullmatch(r"[^\s'\"]+", text) and text.isprintable() else repr(text)


def _unknown_key_hint(path: str) -> str:
    """Name the keys that are allowed where an unknown one was found."""
    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def validate(raw: dict) -> RunConfig:
    """Validate a raw config mapping; raise ConfigError with every problem found. The layers that
    stand apart (the schema, the user's DeepSpeed JSON, the search space) are each checked as far
    as they can be, so that fixing one never uncovers problems the others already had."""
    cfg, problems = _schema(raw)
    # The DeepSpeed JSON first: a file it cannot read is one problem, not one per searched value.
    resolved, more = _apply_deepspeed_json(cfg, raw)
    problems += more
    problems += _search_space_problems(cfg, raw, problems)
    if problems:
        raise ConfigError(problems)
    return resolved


def _schema(raw: dict) -> tuple[RunConfig | None, list[str]]:
    """The config the schema makes of `raw`, or None and its problems."""
    try:
        return RunConfig.model_validate(raw), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            line = _format_error(error)
            if error["type"] == "extra_forbidden":
                line += _unknown_key_hint(".".join(str(p) for p in error["loc"]))
            problems.append(line)
        return None, problems


def _section(raw: dict, name: str) -> BaseModel | None:
    """One top-level section validated alone (None where it has problems of its own): what the
    checks of the other layers can still go by when another section is wrong."""
    value = raw.get(name)
    annotation = RunConfig.model_fields[name].annotation
    try:
        return annotation.model_validate({} if value is None else value)
    except ValidationError:
        return None


def _apply_deepspeed_json(cfg: RunConfig | None, raw: dict) -> tuple[RunConfig | None, list[str]]:
    """Bring a user's DeepSpeed JSON and the `train` section into agreement: the file's concrete
    values decide the fields the YAML left at their defaults; a field both set differently is an
    error naming both. With a config the schema refused (`cfg` None), the file is still read."""
    from trainers.deepspeed_config import DeepSpeedConfigError, read_user_config, reconcile

    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    path = cfg.train.deepspeed_config if cfg is not None else train_raw.get("deepspeed_config")
    if not isinstance(path, str):
        return cfg, []
    try:
        user = read_user_config(path)
    except DeepSpeedConfigError as exc:
        return None, exc.problems
    train = cfg.train if cfg is not None else _section(raw, "train")
    if train is None:
        return None, []
    zero_raw = train_raw.get("zero") if isinstance(train_raw.get("zero"), dict) else {}
    explicit = {f"train.{k}" for k in train_raw} | {f"train.zero.{k}" for k in zero_raw}
    updates, problems = reconcile(user, train.model_dump(mode="json"), explicit, source=path)
    if problems or cfg is None:
        return None, problems
    if not updates:
        return cfg, []
    resolved = copy.deepcopy(raw)
    for field, value in updates.items():
        set_path(resolved, field, list(value) if isinstance(value, tuple) else value)
    return validate(resolved), []  # the updated fields now agree with the file: no further updates


def _search_space_problems(cfg: RunConfig | None, raw: dict, known: list[str]) -> list[str]:
    """The search space's problems. A searched value is blamed only for the problems it adds to
    those the config already has (`known`); with a config the schema refused (`cfg` None), the
    rest is checked against the sections that stand alone."""
    tune = cfg.tune if cfg is not None else _section(raw, "tune")
    if tune is None:
        return []
    distill = cfg.distill if cfg is not None else _section(raw, "distill")
    base = set(known)
    problems = []
    for path, domain in tune.space.items():
        where = f"tune.space.{path}"
        if tune.search == "grid" and domain.kind not in ("choice", "grid"):
            problems.append(f"{where}: tune.search grid tries every value, so it needs choice or grid (got {domain.kind})")
        if tune.search == "optuna" and domain.kind == "grid":
            problems.append(f"{where}: Optuna samples each value itself; use choice instead of grid with tune.search optuna")
        if tune.scheduler == "pbt" and path not in PBT_MUTABLE:
            problems.append(f"{where}: pbt continues trials from other trials' checkpoints, so it can only change "
                            f"{', '.join(PBT_MUTABLE)}; search {path} with scheduler asha or fifo")
        if path == "train.zero.stage" and "auto" in domain.edge_values():
            problems.append(f"{where}: auto is resolved once for the whole run, before any trial starts; list the "
                            f"stages to try (0, 1, 2, 3)")
        if path.split(".")[0] not in TUNABLE_SECTIONS:
            problems.append(f"{where}: only paths under {', '.join(TUNABLE_SECTIONS)} can be searched")
            continue
        for value in domain.edge_values():
            try:
                validate(set_path(copy.deepcopy(raw), path, value) | {"tune": {}})
            except ConfigError as exc:
                added = [p for p in exc.problems if p not in base]
                problems += [f"{where}: value {value!r} is rejected: {p}" for p in added]
                if added:
                    break
    if tune.scheduler == "pbt" and tune.search != "random":
        problems.append(f"tune.search: pbt chooses its own values (it copies and perturbs the best trials'), so it "
                        f"needs search random (got {tune.search})")
    natural = metric_mode(tune.metric)
    if tune.mode is not None and tune.mode != natural:
        problems.append(f"tune.mode: {tune.metric} is better when {'higher' if natural == 'max' else 'lower'}, so mode "
                        f"{tune.mode} would pick the worst trial; use {natural} or leave it out")
    if tune.enabled and not tune.space:
        problems.append("tune.space: empty; add at least one path to search, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
    student = sorted(p for p in tune.space if p.startswith("distill."))
    if student and not searches_student(tune.space):
        teacher = sorted(p for p in tune.space if not p.startswith("distill."))
        problems.append(f"tune.space: {', '.join(student)} search the student and {', '.join(teacher)} the teacher; a sweep "
                        f"trains one of them: search distill paths alone (the sweep distills the trained teacher) or none")
    elif student and distill is not None and not distill.enabled:
        problems.append(f"tune.space: {', '.join(student)} are searched by distilling students, but distill.enabled is false")
    return problems


def set_path(raw: dict, path: str, value: Any) -> dict:
    """Set a dotted path in a raw config mapping, following the schema (the rest of a path
    below a mapping-valued field such as `tune.space` is that mapping's key). Returns `raw`."""
    parts = path.split(".")
    model: type[BaseModel] | None = RunConfig
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        field = model.model_fields.get(part) if model else None
        if model is not None and field is None:
            raise ConfigError([f"{_shown_path(parts[: i + 1])}: unknown key{_unknown_key_hint('.'.join(parts[: i + 1]))}"])
        annotation = field.annotation if field else None
        if last:
            node[part] = value
            return raw
        if node.get(part) is None:
            node[part] = {}
        # A section, or an optional one (model.lora: null until a key of it is set)
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        section = next((a for a in (annotation, *(typing.get_args(annotation) if optional else ()))
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if not section and not str(annotation).startswith("dict["):
            raise ConfigError([f"{_shown_path(parts[: i + 2])}: unknown key ({_shown_path(parts[: i + 1])} is not a section)"])
        if not isinstance(node[part], dict):  # a section, or a mapping-valued field such as tune.space
            raise ConfigError([f"{_shown_path(parts[: i + 1])}: must be a mapping"])
        if not section:
            node[part][".".join(parts[i + 1 :])] = value
            return raw
        node, model = node[part], section
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.path=value`; the value is read as YAML so `3`, `1e-3`, `true`, `[1, 8, 8]` get their types."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        shown = text if text.isprintable() and text.strip() == text and text else repr(text)
        raise ConfigError([f"--set {shown}: expected dotted.path=value"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path.strip(), parsed


def load_raw(config_path: str | os.PathLike) -> dict:
    """A YAML config file as a mapping; a file that is not one, or that gives a key twice, is refused."""
    raw, problems = _read_yaml(config_path)
    if problems:
        raise ConfigError(problems)
    return raw


def _read_yaml(config_path: str | os.PathLike) -> tuple[dict, list[str]]:
    """The mapping and the keys it gives twice (problems found alongside the others), or ConfigError
    for a file that is no config at all."""
    path = Path(config_path)
    if path.is_dir():
        raise ConfigError([f"{path}: a folder, not a config file; give the YAML file (e.g. configs/quickstart.yaml)"])
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever PyYAML says
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (cluster, data, model, ...)"])
    return raw, duplicate_keys(text, str(path))


def duplicate_keys(text: str, source: str) -> list[str]:
    """A problem line for each key given twice in one mapping: YAML keeps the last one silently, so
    `lr:` set twice would train with whichever came last."""
    problems: list[str] = []

    def walk(node: yaml.Node, where: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                path = f"{where}.{name}" if where and name is not None else (name or where)
                if name is not None and name != "<<":  # `<<` merges another mapping in; it may recur
                    if name in seen:
                        first, second = seen[name] + 1, key.start_mark.line + 1
                        lines = f"lines {first} and {second}" if first != second else f"both on line {first}"
                        problems.append(f"{source}: {path} is given twice ({lines}); YAML would keep only the second, "
                                        f"so remove one")
                    seen.setdefault(name, key.start_mark.line)
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{where}[{i}]")

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return problems


def load(config_path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `--set` overrides, validate: ConfigError with every problem."""
    cfg, _, problems = _load(config_path, overrides)
    if problems:
        raise ConfigError(problems)
    return cfg


def _load(config_path: str | os.PathLike, overrides: list[str],
          prepare: Callable[[dict], list[str]] | None = None) -> tuple[RunConfig | None, dict, list[str]]:
    """The config (None where it has problems), the raw mapping after the overrides (and `prepare`,
    which may change it before it is validated), and the problems; ConfigError only for a file that
    is no config at all."""
    raw, problems = _read_yaml(config_path)
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_path(raw, path, value)
        except ConfigError as exc:
            problems += exc.problems
    if prepare is not None and not problems:
        problems += prepare(raw)
    try:
        cfg = validate(raw)
    except ConfigError as exc:
        cfg, problems = None, problems + exc.problems
    return (None if problems else cfg), raw, problems


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML, secrets redacted."""
    return yaml.safe_dump(redacted(cfg.model_dump(mode="json")), sort_keys=False)
