"""`tune.search`: grid enumerates every combination (pure: Ray Tune's own variant generator),
random samples, and Optuna's TPE runs real trials that reach the trials table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.variant_generator import generate_variants

from launcher.cli import main
from tuning.space import max_epochs, tune_domain
from tuning.sweep import search_algorithm

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def _variants(space: dict, search: str) -> list[dict]:
    spec = {path: tune_domain(domain, search) for path, domain in space.items()}
    return [config for _, config in generate_variants(spec)]


def test_search_grid_tries_every_combination_of_choices_once():
    space = {"model.width": {"choice": [8, 16]}, "train.zero.stage": {"grid": [0, 2, 3]}}
    variants = _variants(space, "grid")
    assert sorted((v["model.width"], v["train.zero.stage"]) for v in variants) == [(w, z) for w in (8, 16) for z in (0, 2, 3)]
    # random: grid domains are still enumerated, choices are sampled once per variant
    assert sorted(v["train.zero.stage"] for v in _variants(space, "random")) == [0, 2, 3]


def test_the_searcher_follows_tune_search_and_caps_concurrency():
    optuna = search_algorithm("optuna", "val_accuracy", "max", seed=0, max_concurrent=2)
    assert isinstance(optuna, ConcurrencyLimiter) and optuna.max_concurrent == 2
    assert isinstance(search_algorithm("random", "val_accuracy", "max", 0, 3), BasicVariantGenerator)
    assert max_epochs({"train": {"epochs": 2}}, {"train.epochs": {"grid": [3, 5]}}) == 5


@pytest.mark.ray
def test_optuna_sweep_runs_its_trials_and_records_them(ray_cluster, quickstart_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", str(QUICKSTART), "--stages", "preprocess,tune", "--set", f"output.dir={run_dir}",
                 "--set", f"data.cache_dir={quickstart_cache}",
                 "--set", "tune.search=optuna", "--set", "tune.num_samples=2", "--set", "tune.scheduler=fifo",
                 "--set", "train.epochs=1", "--set", "train.workers=1", "--set", "tune.time_budget_s=600"])
    out = capsys.readouterr().out
    assert code == 0, out
    tune = json.loads((run_dir / "summary.json").read_text())["stages"]["tune"]
    table = pd.read_parquet(run_dir / "tune" / "trials.parquet")
    assert len(table) == 2 and (table["status"] == "completed").all()
    assert json.loads((run_dir / "summary.json").read_text())["stages"]["tune"]["concurrent_trials"] == 2  # 1-CPU trials, 2 CPUs
    lrs = table["train.lr"].tolist()
    assert lrs[0] != lrs[1] and all(5e-4 <= lr <= 5e-3 for lr in lrs)  # Optuna sampled inside the declared range
    assert tune["best_values"]["train.lr"] in lrs and (run_dir / "models" / "teacher").is_dir()
