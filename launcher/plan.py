"""The preflight plan: what a run will ask of the cluster and of each worker's memory, decided
before any worker starts. `raylaunch plan CONFIG` prints it; `raylaunch run` acts on it (resolves
`train.zero.stage: auto`, refuses a model that cannot fit)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from cluster.resources import describe, groups_that_fit, worker_group_demand
from launcher.config import ConfigError
from runconfig.schema import RunConfig
from trainers.memory import HEADROOM, StagePlan, fits, lowest_fitting_stage, plan_all_stages

GIB = 2**30


@dataclass
class Plan:
    params: int
    largest_layer: int
    demand: dict[str, float]
    cluster: dict[str, float]
    concurrent_groups: int
    budget_bytes: float | None
    budget_source: str
    stages: list[StagePlan]
    configured_stage: int | str
    chosen_stage: int | None
    trainable: int | None = None
    """Parameters that train where fewer than all do (LoRA's adapters); None: all."""

    def summary(self) -> dict:
        return {"params": self.params, "trainable_params": self.trainable or self.params,
                "largest_layer_params": self.largest_layer, "worker_group": self.demand,
                "budget_bytes_per_worker": self.budget_bytes, "budget_source": self.budget_source,
                "configured_stage": self.configured_stage, "chosen_stage": self.chosen_stage,
                "per_worker_bytes": {p.stage: p.device_bytes for p in self.stages}}


def model_size(cfg: RunConfig, model: dict | None = None) -> tuple[int, int, int]:
    """Parameters, largest layer and trainable parameters (fewer with LoRA) of the configured
    model, built on the meta device (no memory)."""
    import torch

    from dataprep.peek import peek_shape
    from dataprep.text import HfTokenizer
    from dataprep.text_tables import model_task
    from trainers.memory import largest_layer_params
    from trainers.models import build_model, count_params

    model = model or cfg.model.model_dump(mode="json")
    data = cfg.data.model_dump(mode="json")
    input_shape, num_classes = peek_shape(data, cfg.model.seq_len, model_task(model))
    if model["type"] == "hf":
        from dataprep.text_tables import text_task
        from trainers.models.hf import DATA_TASKS

        model = {**model, "task": DATA_TASKS[text_task(data, model["task"])]}
    tokenizer = HfTokenizer.for_model(model)
    if tokenizer is not None:  # the vocabulary: the model's own tokenizer's, or the BPE's to be trained
        from dataprep.text import tokenizer_of

        vocab = len(tokenizer.load()) if tokenizer.source is not None else tokenizer_of(data)["vocab_size"]
        if model["task"] == "causal_lm":
            num_classes = vocab
        model = {**model, "vocab_size": vocab}
    try:
        with torch.device("meta"):  # a pretrained model's config only: no weights read or allocated
            module = build_model(model, input_shape, num_classes, weights=False)
    except ValueError as exc:  # the model does not fit the data (vocabulary, sequence length)
        raise ConfigError([str(exc)]) from None
    return count_params(module), largest_layer_params(module), sum(p.numel() for p in module.parameters() if p.requires_grad)


def worker_budget(cfg: RunConfig, cluster: dict[str, float]) -> tuple[float | None, str]:
    """Memory one worker may fill with model states: a GPU's memory, or a CPU worker's share."""
    if cfg.train.use_gpu:
        if cfg.cluster.gpu_memory_gb:
            return cfg.cluster.gpu_memory_gb * GIB, "cluster.gpu_memory_gb"
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), f"detected {torch.cuda.get_device_name(0)}"
        return None, "unknown (no GPU on this machine; set cluster.gpu_memory_gb)"
    if cfg.cluster.worker_memory_gb:
        return cfg.cluster.worker_memory_gb * GIB, "cluster.worker_memory_gb"
    return cluster.get("memory", 0.0) / cfg.train.max_workers, f"the cluster's memory / {cfg.train.max_workers} workers"


def make_plan(cfg: RunConfig, cluster: dict[str, float]) -> Plan:
    train = cfg.train
    params, largest, trainable = model_size(cfg)
    trainable = trainable if trainable < params else None
    # An elastic group's fewest workers: each holds the largest share of partitioned states.
    stages = plan_all_stages(params, largest, train.worker_range[0], train.precision, train.zero.offload_optimizer,
                             train.zero.offload_param, trainable)
    budget, source = worker_budget(cfg, cluster)
    configured = train.zero.stage
    if budget is None:
        chosen = None if configured == "auto" else configured
    elif configured == "auto":
        # Offloading exists only from stage 1 (optimizer) or at stage 3 (parameters).
        allowed = [p for p in stages if (not train.zero.offload_param or p.stage == 3)
                   and (not train.zero.offload_optimizer or p.stage >= 1)]
        chosen = lowest_fitting_stage(allowed, budget)
    else:
        chosen = configured
    demand = worker_group_demand(train.max_workers, train.cpus_per_worker, train.use_gpu)
    return Plan(params, largest, demand, cluster, groups_that_fit(cluster, demand), budget, source, stages,
                configured, chosen, trainable)


def check_plan(plan: Plan) -> int:
    """The ZeRO stage to train with; ConfigError (with the numbers) when the model cannot fit."""
    if plan.budget_bytes is None:
        if plan.chosen_stage is None:
            raise ConfigError([f"train.zero.stage: auto needs the GPU's memory: {plan.budget_source}"])
        return plan.chosen_stage
    if plan.chosen_stage is None:
        smallest = min(plan.stages, key=lambda p: p.device_bytes)
        raise ConfigError([
            f"train.zero.stage: no ZeRO stage fits {plan.params:,} parameters in {_gib(plan.budget_bytes)} per worker "
            f"({plan.budget_source}); the smallest, stage {smallest.stage}, needs {_gib(smallest.device_bytes)} of model "
            f"states (at most {HEADROOM:.0%} of the budget); add workers, offload (train.zero.offload_optimizer/offload_param) "
            f"or use a smaller model"])
    chosen = plan.stages[plan.chosen_stage]
    if not fits(chosen, plan.budget_bytes):
        lower = lowest_fitting_stage(plan.stages, plan.budget_bytes)
        hint = f"stage {lower} fits" if lower is not None else "no stage fits"
        raise ConfigError([
            f"train.zero.stage: stage {chosen.stage} needs {_gib(chosen.device_bytes)} of model states per worker for "
            f"{plan.params:,} parameters, over {HEADROOM:.0%} of {_gib(plan.budget_bytes)} ({plan.budget_source}); "
            f"{hint} (or set train.zero.stage: auto)"])
    return plan.chosen_stage


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= 0.01 * GIB else f"{value / 2**20:.2f} MiB"


def print_plan(console: Console, cfg: RunConfig, plan: Plan) -> None:
    train = cfg.train
    trains = f"; {plan.trainable:,} train: LoRA adapters" if plan.trainable else ""
    console.print(f"[bold]model[/] {cfg.model.type}: {plan.params:,} parameters (largest layer {plan.largest_layer:,}{trains}), "
                  f"{train.precision}")
    low, high = train.worker_range
    counts = f"{low}-{high} (as many as the cluster holds; resized as nodes go and come)" if train.elastic else f"{high}"
    console.print(f"[bold]workers[/] {counts} x ({describe({k: v / high for k, v in plan.demand.items()})}) "
                  f"= {describe(plan.demand)}; cluster has {describe({k: v for k, v in plan.cluster.items() if k in ('CPU', 'GPU')})}"
                  f" -> {plan.concurrent_groups} worker group(s) at once")
    if cfg.tune.enabled:
        from tuning.packing import pack, packing_problems

        console.print(f"[bold]sweep[/] {pack(cfg, plan.cluster).line(cfg)}")
        for problem in packing_problems(cfg, plan.cluster):
            console.print(f"[red]{problem}[/]")
    accumulation = (f"{train.slots // low}-{train.grad_accum_steps} accumulation x {low}-{high}" if train.elastic
                    else f"{train.grad_accum_steps} accumulation x {high}")
    console.print(f"[bold]batch[/] {train.micro_batch_size} per worker x {accumulation} workers = "
                  f"{train.batch_triple()[0]} per optimizer step")
    budget = _gib(plan.budget_bytes) if plan.budget_bytes is not None else "?"
    console.print(f"[bold]memory budget[/] {budget} per worker ({plan.budget_source}); model states may use "
                  f"{HEADROOM:.0%}, the rest is left for activations")
    table = Table(title="Model states per worker under each ZeRO stage")
    for column in ("stage", "on device", "offloaded to CPU", "fits", "numbers from"):
        table.add_column(column, justify="left" if column in ("stage", "numbers from") else "right")
    for p in plan.stages:
        fit = "?" if plan.budget_bytes is None else ("yes" if fits(p, plan.budget_bytes) else "no")
        mark = " <- chosen" if p.stage == plan.chosen_stage else ""
        table.add_row(f"{p.stage}{mark}", _gib(p.device_bytes), _gib(p.offloaded_bytes) if p.offloaded_bytes else "-",
                      fit, p.source)
    console.print(table)
    if plan.chosen_stage is None:
        console.print("[red]no ZeRO stage fits[/]")
    else:
        how = "picked by zero.stage: auto (the lowest that fits)" if plan.configured_stage == "auto" else "configured"
        console.print(f"ZeRO stage {plan.chosen_stage}: {how}")
