"""Search spaces declared in YAML, as Ray Tune domains, and their application to a config."""

from __future__ import annotations

from ray import tune

from runconfig.schema import searches_student


def tune_domain(domain: dict, search: str = "random"):
    """A Ray Tune sampler for one validated `tune.space` entry; `search: grid` enumerates choices."""
    if domain.get("grid") is not None or (search == "grid" and domain.get("choice") is not None):
        return tune.grid_search(domain["grid"] if domain.get("grid") is not None else domain["choice"])
    if domain.get("choice") is not None:
        return tune.choice(domain["choice"])
    if domain.get("uniform") is not None:
        return tune.uniform(*domain["uniform"])
    if domain.get("loguniform") is not None:
        return tune.loguniform(*domain["loguniform"])
    return tune.randint(*domain["randint"])


def mutation_domain(domain: dict):
    """What PBT may move a `tune.space` entry to when it perturbs a trial: a grid's values are choices."""
    return tune.choice(domain["grid"]) if domain.get("grid") is not None else tune_domain(domain)


def epochs_path(space: dict) -> str:
    return "distill.epochs" if searches_student(space) else "train.epochs"


def planned_epochs(run: dict, space: dict, values: dict) -> int:
    """The epochs a trial with these sampled `values` trains (a student's default to train.epochs)."""
    if epochs_path(space) in values:
        return values[epochs_path(space)]
    return (run["distill"]["epochs"] or run["train"]["epochs"]) if searches_student(space) else run["train"]["epochs"]


def max_epochs(run: dict, space: dict) -> int:
    """The most epochs any trial can run: ASHA's max_t."""
    domain = space.get(epochs_path(space))
    if domain is None:
        return planned_epochs(run, space, {})
    for kind in ("choice", "grid"):
        if domain.get(kind) is not None:
            return max(domain[kind])
    return int(max(v for v in domain.values() if v is not None)[1])
