"""The typed path from a config to the workers: the validated config is resolved once, after Ray
starts (runconfig.resolved), config.yaml is written from what was resolved, and every training run's
workers get one WorkerConfig built from it (trainers.worker)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from launcher.config import load
from launcher.pipeline import run_pipeline
from runconfig.resolved import REDACTED, ResolvedConfig
from runconfig.schema import RunConfig
from trainers.worker import Distillation, Fault, worker_config

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
META = {"rows": {"train": 1259, "val": 269, "test": 269}, "input_shape": [64], "num_classes": 10, "task": "classify"}


def _run(**sections) -> RunConfig:
    return RunConfig.model_validate({"model": {"type": "mlp", "width": 16, "depth": 1}} | sections)


def test_a_resolved_config_is_a_copy_with_a_zero_stage_and_refuses_auto():
    given = _run(train={"zero": {"stage": "auto"}})
    resolved = ResolvedConfig.of(given, zero_stage=1, deepspeed_user={"steps_per_print": 10}, resources={"CPU": 2.0})
    assert resolved.run.train.zero.stage == 1 and given.train.zero.stage == "auto"
    given.train.lr = 0.5  # the caller's object changing later changes nothing resolved
    assert resolved.run.train.lr == RunConfig().train.lr
    with pytest.raises(ValueError, match="resolve train.zero.stage: auto first"):
        ResolvedConfig.of(given)
    with pytest.raises(AttributeError):
        resolved.run = given  # frozen


def test_a_trials_overrides_are_validated_and_keep_the_deepspeed_json_and_the_redaction():
    given = _run(cluster={"job": {"env_vars": {"HF_TOKEN": "secret"}}})
    resolved = ResolvedConfig.of(given, deepspeed_user={"steps_per_print": 10})
    trial = resolved.with_overrides({"train.lr": 0.01, "model.width": 8})
    assert (trial.run.train.lr, trial.run.model.width, trial.deepspeed_user) == (0.01, 8, {"steps_per_print": 10})
    assert trial.run.cluster.job.env_vars == {"HF_TOKEN": REDACTED} and resolved.dump()["cluster"]["job"]["env_vars"] == {"HF_TOKEN": REDACTED}
    with pytest.raises(ValueError, match="train.workers"):
        resolved.with_overrides({"train.workers": 0})


def test_the_worker_config_computes_the_batch_triple_and_steps_once():
    run = _run(train={"workers": 2, "micro_batch_size": 32, "grad_accum_steps": 2, "epochs": 3, "zero": {"stage": 1}})
    config = worker_config(ResolvedConfig.of(run), META)
    # 1259 rows: 314 a micro-batch slot (4: 2 workers x 2), 9 whole optimizer steps of 4 x 32 rows.
    assert (config.steps_per_epoch, config.slots, config.total_steps) == (9, 4, 27)
    batch = config.deepspeed
    assert (batch["train_batch_size"], batch["train_micro_batch_size_per_gpu"], batch["gradient_accumulation_steps"]) \
        == run.train.batch_triple() == (128, 32, 2)
    assert batch["scheduler"]["params"]["total_num_steps"] == 27
    assert config.distill is None and config.model == run.model and config.lr_path == "train.lr"


def test_a_worker_group_of_any_size_accumulates_over_its_share_of_the_same_global_batch():
    from trainers.loop import for_world

    run = _run(train={"workers": 2, "micro_batch_size": 32, "grad_accum_steps": 2, "zero": {"stage": 2}})
    deepspeed = worker_config(ResolvedConfig.of(run), META).deepspeed
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        config = for_world(deepspeed, world)
        assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
                config["gradient_accumulation_steps"]) == (128, 32, accum)
        assert "load_universal" not in config.get("checkpoint", {})
    assert for_world(deepspeed, 1, universal=True)["checkpoint"]["load_universal"] is True
    assert "checkpoint" not in deepspeed or "load_universal" not in deepspeed["checkpoint"]  # a copy changed


def test_a_distillation_trains_the_student_with_its_own_epochs_and_lr():
    run = _run(train={"epochs": 4, "lr": 1e-3, "zero": {"stage": 2}},
               distill={"student": {"type": "mlp", "width": 4, "depth": 1}, "epochs": 2, "lr": 5e-3, "alpha": 0.5})
    config = worker_config(ResolvedConfig.of(run), META, teacher_dir="/models/teacher")
    assert config.model.width == 4 and (config.train.epochs, config.train.lr, config.lr_path) == (2, 5e-3, "distill.lr")
    assert config.distill == Distillation("/models/teacher", 4.0, 0.5, "live")
    assert run.train.epochs == 4  # the run's own section is not changed
    faulty = config.replace(fault=Fault(rank=1, step=2, where="save", marker="/tmp/m"), trial="t1")
    assert (faulty.fault.where, faulty.trial, config.fault, config.trial) == ("save", "t1", None, None)


def test_a_run_with_no_full_step_is_refused_naming_the_batch():
    run = _run(train={"workers": 2, "micro_batch_size": 1024, "zero": {"stage": 0}})
    with pytest.raises(ValueError, match="train.micro_batch_size: 1259 train rows make no full optimizer step"):
        worker_config(ResolvedConfig.of(run), META)


def test_config_yaml_holds_the_stage_auto_resolved_to_and_a_resume_keeps_it(ray_cluster, quickstart_cache, tmp_path):
    out = tmp_path / "run"
    cfg = load(QUICKSTART, ["train.zero.stage=auto", f"data.cache_dir={quickstart_cache}", f"output.dir={out}"])
    console = Console(file=io.StringIO(), width=200)
    summary = run_pipeline(cfg, ["preprocess"], console)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg.train.zero.stage == "auto"  # the caller's config is not changed
    assert saved["train"]["zero"]["stage"] == summary["zero_stage"] == summary["plan"]["chosen_stage"] in (0, 1, 2, 3)

    # Resumed where `auto` would pick another stage (another machine): the stage its checkpoints have.
    other = 3 if saved["train"]["zero"]["stage"] != 3 else 2
    saved["train"]["zero"]["stage"] = other
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    from launcher.checks import input_problems

    assert input_problems(cfg, cfg.model_dump(mode="json"), ["preprocess"], resume=True) == []
    resumed = run_pipeline(cfg, ["preprocess"], console, resume=True)
    assert resumed["zero_stage"] == other
    assert f"zero.stage auto -> {other}, as the interrupted run resolved it" in console.file.getvalue()
