"""Bring your own DeepSpeed JSON: published example configs, their "auto" values filled from the
YAML, conflicts caught before launch, and the result trains under Ray Train on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.session import free_port
from launcher.cli import main
from launcher.config import load
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig, TrainConfig
from trainers.deepspeed_config import deepspeed_config
from trainers.fit import build_trainer, load_splits
from trainers.worker import worker_config

# The ZeRO-2 example of Hugging Face Transformers' DeepSpeed integration docs (offload to CPU).
HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}

# LLaMA-Factory's examples/deepspeed/ds_z3_offload_config.json: ZeRO-3, optimizer and parameters offloaded.
LLAMA_FACTORY_ZERO3_OFFLOAD = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
}


def _write(tmp_path, name: str, content: dict | str) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _config_file(tmp_path, train: dict) -> str:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"type": "mlp", "width": 32, "depth": 1}, "train": train}))
    return str(path)


def test_file_values_decide_fields_the_yaml_left_at_defaults(tmp_path):
    ds = _write(tmp_path, "z3.json", LLAMA_FACTORY_ZERO3_OFFLOAD)
    cfg = load(_config_file(tmp_path, {"deepspeed_config": ds, "lr": 1e-3}))
    assert cfg.train.zero.stage == 3 and cfg.train.zero.offload_optimizer and cfg.train.zero.offload_param
    filled = deepspeed_config(cfg.train, hidden_size=32, total_steps=40,
                              user=LLAMA_FACTORY_ZERO3_OFFLOAD)
    assert filled["train_batch_size"] == 32 * 1 * 2 and filled["train_micro_batch_size_per_gpu"] == 32
    assert filled["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 320
    assert filled["fp16"]["enabled"] is False and filled["bf16"]["enabled"] is False
    assert filled["optimizer"]["params"]["lr"] == 1e-3  # no optimizer in the file: raylaunch's AdamW
    assert filled["scheduler"]["type"] == "WarmupCosineLR" and filled["scheduler"]["params"]["total_num_steps"] == 40
    assert filled["zero_optimization"]["sub_group_size"] == 1e9  # the file's own settings are kept
    assert "auto" not in json.dumps(filled)


def test_autos_in_the_hugging_face_example_are_filled(tmp_path):
    ds = _write(tmp_path, "z2.json", HF_ZERO2)
    cfg = load(_config_file(tmp_path, {"deepspeed_config": ds, "lr": 5e-4, "warmup_steps": 3, "grad_clip": 1.0,
                                       "grad_accum_steps": 2}))
    filled = deepspeed_config(cfg.train, 32, 40, HF_ZERO2)
    assert filled["optimizer"]["params"] | {} == {"lr": 5e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                                   "torch_adam": True, "fused": True}
    assert filled["scheduler"] == {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-4,
                                                                  "warmup_num_steps": 3}}
    assert (filled["gradient_clipping"], filled["gradient_accumulation_steps"], filled["train_batch_size"]) == (1.0, 2, 128)
    assert filled["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and cfg.train.zero.offload_optimizer


@pytest.mark.parametrize(("train", "file_values", "expected"), [
    ({"lr": 1e-3}, {"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}},
     "train.lr: 0.001 here but optimizer.params.lr: 3e-05 in"),
    ({"zero": {"stage": 1}}, {"zero_optimization": {"stage": 3}},
     "train.zero.stage: 1 here but zero_optimization.stage: 3 in"),
    ({"micro_batch_size": 16}, {"train_micro_batch_size_per_gpu": 8},
     "train.micro_batch_size: 16 here but train_micro_batch_size_per_gpu: 8 in"),
    ({}, {"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8},
     "train.workers: train_batch_size 100 in"),
])
def test_a_value_both_set_differently_is_a_config_error_naming_both(tmp_path, capsys, train, file_values, expected):
    ds = _write(tmp_path, "ds.json", file_values)
    code = main(["config", "show", _config_file(tmp_path, {"deepspeed_config": ds} | train)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert "Traceback" not in err


def test_broken_or_missing_file_is_a_one_line_error(tmp_path, capsys):
    for content, expected in (("{not json", "is not valid JSON (line 1"), ("[1, 2]", "must hold a JSON object")):
        ds = _write(tmp_path, "bad.json", content)
        assert main(["config", "show", _config_file(tmp_path, {"deepspeed_config": ds})]) == 2
        assert expected in capsys.readouterr().err
    assert main(["config", "show", _config_file(tmp_path, {"deepspeed_config": str(tmp_path / "nope.json")})]) == 2
    assert "train.deepspeed_config: no such file" in capsys.readouterr().err


def test_an_auto_raylaunch_cannot_fill_is_named():
    with pytest.raises(Exception, match="zero_optimization.sub_group_size is \"auto\""):
        deepspeed_config(TrainConfig(), 32, 10, {"zero_optimization": {"stage": 2, "sub_group_size": "auto"}})


def load_defaults() -> dict:
    return TrainConfig().model_dump(mode="json")


ONE_RANK = Path(__file__).parent / "scripts" / "one_rank.py"  # real DeepSpeed engines over gloo, one rank


def test_cpu_workers_get_torchs_fused_adamw_and_other_optimizers_train_as_the_file_says():
    train = TrainConfig(micro_batch_size=8, workers=1, grad_clip=1.0, lr_schedule="constant")
    default = deepspeed_config(train, 32, 10)
    assert default["optimizer"]["params"]["torch_adam"] and default["optimizer"]["params"]["fused"]
    unfused = json.loads(json.dumps(default))
    del unfused["optimizer"]["params"]["fused"]
    autos = dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto")
    foreach = deepspeed_config(train, 32, 10, {"optimizer": {"type": "AdamW", "params": autos | {"foreach": True}}})
    assert "fused" not in foreach["optimizer"]["params"]  # torch refuses fused and foreach together
    adagrad = deepspeed_config(train, 32, 10, {"optimizer": {"type": "Adagrad", "params": {"lr": 0.01}}})
    assert adagrad["optimizer"]["params"] == {"lr": 0.01}  # no Adam keys: torch's Adagrad refuses them
    zero2 = json.loads(json.dumps(default)) | {"zero_optimization": {"stage": 2}}
    configs = {"default": default, "unfused": unfused, "foreach": foreach, "adagrad": adagrad, "zero2": zero2}
    runs = {name: {"config": config, "micro_batches": 10} for name, config in configs.items()}
    done = subprocess.run([sys.executable, str(ONE_RANK), str(free_port()), json.dumps(runs)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert (out["default"]["optimizer"], out["default"]["fused"]) == ("AdamW", True)
    assert (out["zero2"]["optimizer"], out["zero2"]["fused"]) == ("AdamW", True)
    assert (out["unfused"]["fused"], out["foreach"]["fused"]) == (None, None)
    assert out["adagrad"]["optimizer"] == "Adagrad"
    # The fused kernel is the same AdamW: after 10 steps the weights agree with torch's default kernel,
    # with and without ZeRO's flat partition.
    for name in ("unfused", "foreach", "zero2"):
        assert out[name]["weights"] == pytest.approx(out["default"]["weights"], rel=1e-5, abs=1e-6), name
    assert out["adagrad"]["weights"] != pytest.approx(out["default"]["weights"], rel=1e-3)


def test_fp16_in_the_file_on_cpu_workers_is_refused(tmp_path, capsys):
    ds = _write(tmp_path, "fp16.json", {"fp16": {"enabled": True}})
    assert main(["config", "show", _config_file(tmp_path, {"deepspeed_config": ds})]) == 2
    assert "train.precision: fp16 needs use_gpu: true" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hf_zero2_offload", "llama_factory_zero3_offload"])
def test_published_configs_train_under_ray_train(name, digits_data, tmp_path):
    data_dir, meta = digits_data
    user = HF_ZERO2 if name == "hf_zero2_offload" else LLAMA_FACTORY_ZERO3_OFFLOAD
    ds = _write(tmp_path, f"{name}.json", user)
    cfg = load(_config_file(tmp_path, {"deepspeed_config": ds, "epochs": 2, "lr": 3e-3, "grad_clip": 1.0}))
    run = ResolvedConfig.of(cfg, deepspeed_user=user)
    result = build_trainer(worker_config(run, meta), load_splits(data_dir), tmp_path / "ray", name=name).fit()
    assert result.metrics["val_accuracy"] > 0.7  # 10 classes


def test_zero_without_clipping_skips_the_gradient_norm_and_an_adopted_checkpoint_clips_as_the_trial_says(tmp_path):
    base = load_defaults() | {"micro_batch_size": 8, "workers": 1, "lr_schedule": "constant"}

    def config(stage: int, clip: float, offload: bool = False, **kwargs) -> dict:
        zero = base["zero"] | {"stage": stage, "offload_optimizer": offload}
        return deepspeed_config(TrainConfig.model_validate(base | {"grad_clip": clip, "zero": zero}), 32, 10, **kwargs)

    for stage in (1, 2):
        assert config(stage, 0.0)["zero_optimization"]["compute_grad_norm"] is False
    # Clipping reads the norm; ZeRO-0 and 3 have no such setting; DeepSpeed refuses it with offload; a run
    # that may continue a checkpoint saved with clipping keeps it; a file's own value stands.
    for stage, clip, offload, kwargs in [(2, 1.0, False, {}), (0, 0.0, False, {}), (3, 0.0, False, {}),
                                         (2, 0.0, True, {}), (2, 0.0, False, {"keep_grad_norm": True}),
                                         (2, 0.0, False, {"user": {"zero_optimization": {"compute_grad_norm": True}}})]:
        assert config(stage, clip, offload, **kwargs)["zero_optimization"].get("compute_grad_norm", True), (stage, clip, kwargs)
    # A sweep searching train.grad_clip keeps the norm in every trial (PBT may hand a trial without clipping
    # another's checkpoint saved with it); one that does not search it skips the norm.
    section = {"model": {"type": "mlp", "width": 32, "depth": 1},
               "train": {"workers": 1, "micro_batch_size": 8, "zero": {"stage": 2}}}
    meta = {"rows": {"train": 100}, "input_shape": [64], "num_classes": 10}
    run = ResolvedConfig.of(RunConfig.model_validate(section))
    assert worker_config(run, meta).deepspeed["zero_optimization"]["compute_grad_norm"] is False
    searched = ResolvedConfig.of(RunConfig.model_validate(section | {"tune": {"space": {"train.grad_clip": {"grid": [0.0, 1.0]}}}}))
    assert "compute_grad_norm" not in worker_config(searched, meta).deepspeed["zero_optimization"]

    with_norm = config(2, 0.0)
    del with_norm["zero_optimization"]["compute_grad_norm"]
    checkpoint = str(tmp_path / "clipped")
    runs = {"with_norm": {"config": with_norm, "micro_batches": 10},
            "without_norm": {"config": config(2, 0.0), "micro_batches": 10},
            "clipped": {"config": config(2, 1.0), "micro_batches": 4, "save": checkpoint},
            # PBT trials continuing the clipped trial's checkpoint with their own clipping
            "adopted_unclipped": {"config": config(2, 0.0, keep_grad_norm=True), "micro_batches": 2, "adopt": checkpoint},
            "adopted_tighter": {"config": config(2, 0.25), "micro_batches": 2, "adopt": checkpoint}}
    done = subprocess.run([sys.executable, str(ONE_RANK), str(free_port()), json.dumps(runs)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["without_norm"]["grad_norm"] is None and out["with_norm"]["grad_norm"] > 0
    assert out["without_norm"]["moved"] and out["without_norm"]["weights"] == out["with_norm"]["weights"]  # bit for bit
    # DeepSpeed's ZeRO-1/2 take the clipping saved in a checkpoint they load; the trial's own is put back.
    assert (out["clipped"]["clip"], out["adopted_unclipped"]["clip"], out["adopted_tighter"]["clip"]) == (1.0, 0.0, 0.25)
