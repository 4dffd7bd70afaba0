"""The DeepSpeed config a worker's engine is built from, derived from the `train` section."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(train: dict, lr: float) -> dict:
    """DeepSpeed JSON for a `train` section. The batch triple is the one the config validated:
    train_batch_size = micro_batch_size x grad_accum_steps x workers."""
    micro, accum = train["micro_batch_size"], train["grad_accum_steps"]
    config = {
        "train_batch_size": micro * accum * train["workers"],
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # On CPU, DeepSpeed's own Adam would JIT-compile another C++ op; torch's AdamW is
        # as fast at these sizes. GPUs get DeepSpeed's fused Adam.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": train["weight_decay"],
                                                   "torch_adam": not train["use_gpu"]}},
        "zero_optimization": {"stage": train["zero"]["stage"]},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train["precision"] == "bf16":
        config["bf16"] = {"enabled": True}
    elif train["precision"] == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
