"""How much memory a worker needs for model states (weights, gradients, optimizer states) under
each ZeRO stage and offload choice, and the lowest stage that fits a budget. Pure arithmetic on
parameter counts; activations are not modelled, so a stage "fits" only with headroom left.

Bytes per parameter (Adam): mixed precision (bf16/fp16) keeps 2-byte weights and gradients plus
12 bytes of fp32 master weights, momentum and variance; fp32 training keeps 4 + 4 + 8. ZeRO-1
shards the optimizer term across the N data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also
the weights (plus one gathered layer at a time). Offloading moves the optimizer term (and, at
stage 3, the weights) to CPU memory. For mixed precision at stages 2 and 3, DeepSpeed's own
estimators (`estimate_zero2/3_model_states_mem_needs`) give the numbers instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers import import_deepspeed

HEADROOM = 0.8  # model states may take at most this share of the budget; the rest is for activations


@dataclass(frozen=True)
class StagePlan:
    stage: int
    device_bytes: int
    """Model-state bytes on each worker's device (the GPU, or the CPU worker's own memory)."""
    offloaded_bytes: int
    """Bytes each worker keeps in CPU memory because of offloading (0 without offload)."""
    source: str
    """Where the numbers come from: "formula" or "deepspeed estimator"."""


def largest_layer_params(model) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def plan_stage(stage: int, params: int, largest_layer: int, workers: int, precision: str,
               offload_optimizer: bool = False, offload_param: bool = False, trainable: int | None = None) -> StagePlan:
    """`trainable`: the parameters that train where not all do (LoRA): only they have gradients
    and optimizer states (DeepSpeed's estimators assume all do, so the formula counts them)."""
    mixed = precision in ("bf16", "fp16")
    if mixed and stage in (2, 3) and trainable is None:
        return _deepspeed_estimate(stage, params, largest_layer, workers, offload_optimizer, offload_param)
    learned = params if trainable is None else trainable
    weight, grad, optim = (2, 2, 12) if mixed else (4, 4, 8)
    shards = {"weights": workers if stage >= 3 else 1, "grads": workers if stage >= 2 else 1,
              "optim": workers if stage >= 1 else 1}
    weights = weight * params / shards["weights"] + (weight * largest_layer if stage >= 3 else 0)
    grads = grad * learned / shards["grads"]
    optimizer = optim * learned / shards["optim"]
    device, offloaded = weights + grads + optimizer, 0.0
    if offload_optimizer and stage >= 1:
        device, offloaded = device - optimizer, offloaded + optimizer
    if offload_param and stage >= 3:
        moved = weight * params / shards["weights"]
        device, offloaded = device - moved, offloaded + moved
    return StagePlan(stage, int(device), int(offloaded), "formula")


def _deepspeed_estimate(stage: int, params: int, largest_layer: int, workers: int, offload_optimizer: bool,
                        offload_param: bool) -> StagePlan:
    # DeepSpeed's estimators count the whole node's CPU memory (all ranks' shards plus a 1.5x
    # buffer); per worker that is the node total over the ranks on it (one node of `workers` here).
    import_deepspeed()
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, device = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=workers, num_nodes=1,
                                                            cpu_offload=offload_optimizer)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, device, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=workers,
                                                               num_nodes=1, cpu_offload=offload_optimizer,
                                                               cpu_offload_params=offload_param)
    offloaded = cpu // workers if (offload_optimizer or offload_param) else 0
    return StagePlan(stage, int(device), int(offloaded), "deepspeed estimator")


def plan_all_stages(params: int, largest_layer: int, workers: int, precision: str,
                    offload_optimizer: bool = False, offload_param: bool = False,
                    trainable: int | None = None) -> list[StagePlan]:
    """One plan per stage 0-3; offload applies where the stage allows it."""
    return [plan_stage(s, params, largest_layer, workers, precision, offload_optimizer and s >= 1,
                       offload_param and s >= 3, trainable) for s in range(4)]


def fits(plan: StagePlan, budget_bytes: float) -> bool:
    return plan.device_bytes <= HEADROOM * budget_bytes


def lowest_fitting_stage(plans: list[StagePlan], budget_bytes: float) -> int | None:
    """The lowest ZeRO stage whose model states fit the budget (least communication), or None."""
    return next((p.stage for p in plans if fits(p, budget_bytes)), None)
