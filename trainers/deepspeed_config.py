"""The DeepSpeed config a worker's engine is built from.

Two ways in, one table between them. Without `train.deepspeed_config`, raylaunch writes the
whole JSON from the `train` section. With it, the user's file (the shape Hugging Face and
DeepSpeed's examples ship) is the starting point: each `"auto"` is filled from the `train`
section, and `FIELDS` says which raylaunch field owns which JSON key, so that a value both set
differently is caught before launch (`reconcile`) instead of surfacing as a DeepSpeed assertion
inside a worker. Pure functions of plain dicts: no torch, no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runconfig.problems import BadInput
from runconfig.schema import TrainConfig

AUTO = "auto"
OFF = {"none", None, False}

# JSON key path -> raylaunch field path, for values that exist on both sides.
FIELDS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer.params.lr": "train.lr",
    "optimizer.params.weight_decay": "train.weight_decay",
    "optimizer.params.betas": "train.adam_betas",
    "scheduler.params.warmup_max_lr": "train.lr",
    "scheduler.params.warmup_num_steps": "train.warmup_steps",
    "zero_optimization.stage": "train.zero.stage",
    "zero_optimization.offload_optimizer.device": "train.zero.offload_optimizer",
    "zero_optimization.offload_param.device": "train.zero.offload_param",
    "fp16.enabled": "train.precision",
    "bf16.enabled": "train.precision",
}


class DeepSpeedConfigError(BadInput, ValueError):
    """Problems with a user's DeepSpeed JSON; one `path: problem` line each."""


def read_user_config(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError([f"train.deepspeed_config: no such file {path}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeepSpeedConfigError([f"train.deepspeed_config: cannot read {path}: {exc}"]) from None
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError([f"train.deepspeed_config: {path} is not valid JSON "
                                    f"(line {exc.lineno}, column {exc.colno}): {exc.msg}"]) from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError([f"train.deepspeed_config: {path} must hold a JSON object"])
    return data


def _get(tree: dict, path: str, default: Any = None) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _field_value(json_path: str, value: Any) -> Any:
    """The raylaunch field value a concrete JSON value at `json_path` stands for."""
    if json_path.endswith(".device"):
        return value not in OFF
    if json_path in ("fp16.enabled", "bf16.enabled"):
        return json_path.split(".")[0] if value else None
    if json_path == "optimizer.params.betas":
        return tuple(value)
    return value


def reconcile(user: dict, train: dict, explicit: set[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """Compare a user's DeepSpeed JSON with the `train` section before launch.

    Returns the raylaunch fields the JSON decides (concrete JSON values for fields the YAML left
    at their defaults) and the conflicts: a concrete JSON value different from a field the YAML
    set explicitly (`explicit` holds dotted paths such as `train.lr`)."""
    updates, problems = {}, []
    for json_path, field in FIELDS.items():
        value = _get(user, json_path, AUTO)
        if value == AUTO:
            continue
        if json_path in ("fp16.enabled", "bf16.enabled") and not value:
            precision = json_path.split(".")[0]
            if train["precision"] == precision:
                problems.append(f"{field}: {precision} here but {json_path}: false in {source}; make them agree")
            continue
        wanted = _field_value(json_path, value)
        current = updates.get(field, _get({"train": train}, field))
        if wanted == current:
            continue
        if field in explicit or field in updates:
            problems.append(f"{field}: {_show(current)} here but {json_path}: {_show(value)} in {source}; "
                            f"set one of them, or make them agree")
        else:
            updates[field] = wanted
    batch = _get(user, "train_batch_size", AUTO)
    if batch != AUTO:
        micro = _get(user, "train_micro_batch_size_per_gpu", AUTO)
        accum = _get(user, "gradient_accumulation_steps", AUTO)
        micro = train["micro_batch_size"] if micro == AUTO else micro
        accum = train["grad_accum_steps"] if accum == AUTO else accum
        workers = max(train["workers"]) if isinstance(train["workers"], (list, tuple)) else train["workers"]
        if batch != micro * accum * workers:
            problems.append(f"train.workers: train_batch_size {batch} in {source} must equal "
                            f"train_micro_batch_size_per_gpu x gradient_accumulation_steps x workers = "
                            f"{micro} x {accum} x {workers} = {micro * accum * workers}")
    return updates, problems


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def deepspeed_config(train: TrainConfig, hidden_size: int, total_steps: int, user: dict | None = None,
                     keep_grad_norm: bool = False) -> dict:
    """The DeepSpeed JSON for one training run.

    `train` is the resolved section (after `reconcile`'s updates), `hidden_size` the model's width
    (Hugging Face derives bucket sizes from it), `total_steps` the optimizer steps of the whole run
    (the schedule's length). With `user`, that JSON is the base: its `"auto"` values are filled and
    its own settings kept; keys it lacks that raylaunch owns (batch triple, clipping, stage) are added.
    `keep_grad_norm`: the run may load a checkpoint trained with clipping (`grad_norm_unused`)."""
    config = json.loads(json.dumps(user)) if user is not None else {}

    def fill(path: str, value: Any, only_auto: bool = False) -> None:
        current = _get(config, path, _MISSING)
        if current == AUTO or (current is _MISSING and not only_auto):
            _set(config, path, value)

    batch, micro, accum = train.batch_triple()
    fill("train_batch_size", batch)
    fill("train_micro_batch_size_per_gpu", micro)
    fill("gradient_accumulation_steps", accum)
    fill("gradient_clipping", train.grad_clip)
    fill("steps_per_print", 2**31 - 1)
    fill("wall_clock_breakdown", False)
    fill("zero_optimization.stage", train.zero.stage)
    for kind in ("offload_optimizer", "offload_param"):
        device = "cpu" if getattr(train.zero, kind) else "none"
        fill(f"zero_optimization.{kind}.device", device, only_auto=not getattr(train.zero, kind))

    optimizer = {"lr": train.lr, "weight_decay": train.weight_decay, "betas": list(train.adam_betas), "eps": 1e-8}
    if "optimizer" not in config:
        config["optimizer"] = {"type": "AdamW", "params": optimizer}
    for key, value in optimizer.items():
        fill(f"optimizer.params.{key}", value, only_auto=True)

    if "scheduler" not in config and train.lr_schedule == "cosine":
        # DeepSpeed's WarmupCosineLR: linear warmup from 0, cosine down to min_lr_ratio at total_steps.
        config["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_num_steps": max(train.warmup_steps, 1),
            "warmup_min_ratio": 0.0 if train.warmup_steps else 1.0, "warmup_type": "linear",
            "cos_min_ratio": train.min_lr_ratio}}
    # DeepSpeed's warmup schedulers insist on at least one warmup step.
    scheduler = {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr, "warmup_num_steps": max(train.warmup_steps, 1),
                 "total_num_steps": max(total_steps, 1)}
    for key, value in scheduler.items():
        fill(f"scheduler.params.{key}", value, only_auto=True)

    for precision in ("fp16", "bf16"):
        enabled = train.precision == precision
        if precision in config:
            fill(f"{precision}.enabled", enabled, only_auto=True)
        elif enabled:
            # fp16: loss_scale 0 is dynamic loss scaling, starting at 2**16.
            config[precision] = {"enabled": True} | ({"loss_scale": 0, "initial_scale_power": 16} if precision == "fp16" else {})

    # The sizes Hugging Face's integration derives from the hidden size, where a file asks for them.
    fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, only_auto=True)
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), only_auto=True)
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, only_auto=True)
    fill("zero_optimization.stage3_gather_16bit_weights_on_model_save", True, only_auto=True)

    if not keep_grad_norm and grad_norm_unused(config):
        fill("zero_optimization.compute_grad_norm", False)

    leftover = sorted(_auto_paths(config))
    if leftover:
        raise DeepSpeedConfigError([f"train.deepspeed_config: {p} is \"auto\" but raylaunch has no value for it; "
                                    f"set it in the file" for p in leftover])
    if not train.use_gpu:
        cpu_optimizer(config["optimizer"])
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def grad_norm_unused(config: dict) -> bool:
    """Whether ZeRO-1/2 may skip the global gradient norm (DeepSpeed's `compute_grad_norm: false`).

    Every optimizer step they all-reduce the norm of the partitioned gradients, for clipping and for
    `get_global_grad_norm()`; without clipping nothing reads it (raylaunch does not). On 2 CPU ranks of
    the digits CNN that collective took a tenth of each rank's time, and ZeRO-2 trained 19% faster
    without it (bench/RESULTS.md); the weights are the same bit for bit. DeepSpeed refuses the setting
    with optimizer offload, ZenFlow, ZeRO-1's own bf16 optimizer (bf16 weights, fp32 gradient
    accumulation) and, on loading, a checkpoint saved with clipping: a run that may continue another's
    checkpoint trained with clipping (a sweep searching `train.grad_clip`) keeps the norm."""
    stage = _get(config, "zero_optimization.stage", 0)
    offload = _get(config, "zero_optimization.offload_optimizer.device") not in OFF
    bf16_optimizer = (stage == 1 and _get(config, "bf16.enabled") is True
                      and _get(config, "data_types.grad_accum_dtype") is not None)
    zenflow = "zenflow" in (_get(config, "zero_optimization") or {})
    return (stage in (1, 2) and not config.get("gradient_clipping") and not offload and not zenflow
            and not bf16_optimizer)


def cpu_optimizer(optimizer: dict) -> None:
    """An Adam or AdamW for CPU workers: torch's, with its fused CPU kernel.

    DeepSpeed's own Adam (and its CPU-offload Adam) would JIT-compile another C++ op on CPU workers;
    torch's is as fast at the sizes CPUs train, and DeepSpeed accepts it with offload once told not
    to insist on DeepSpeedCPUAdam (`zero_force_ds_cpu_optimizer`). torch's default CPU AdamW runs a
    dozen separate ops over every weight tensor a step; the fused kernel makes one pass: 0.44 -> 0.11
    ms a step for the digits CNN, 1.87 -> 0.43 ms for configs/lm.yaml's GPT (bench/RESULTS.md). A
    file's own `foreach` or `fused` is kept. DeepSpeed passes its params straight to the optimizer
    it builds, so other types (Adagrad, Lion, ...) get neither key: torch's Adagrad refuses them."""
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return
    params = optimizer.setdefault("params", {})
    params["torch_adam"] = True
    if not params.get("foreach"):  # torch refuses both at once
        params.setdefault("fused", True)


_MISSING = object()


def _auto_paths(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if tree == AUTO else []
