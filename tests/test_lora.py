"""LoRA (`model.lora`, PEFT) on a transformers model under DeepSpeed: only the adapters reach the
optimizer at every ZeRO stage, the checkpoints hold them alone, the export is the merged model
(plain transformers) with the adapter in PEFT's layout beside it. Tiny models made here."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from conftest import raylaunch
from hf_models import LLAMA, save_model

SEQ = 256
LORA = {"r": 2, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama"), LLAMA | {"max_position_embeddings": SEQ})


def test_adapters_go_on_the_named_layers_and_alone_train(llama):
    from runconfig.schema import ModelConfig
    from trainers.models.hf import build_hf

    section = ModelConfig(type="hf", name_or_path=str(llama), seq_len=SEQ, task="causal_lm", lora=LORA).model_dump()
    model = build_hf(section, [SEQ], 384)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    # B starts at zero: before training the adapted model is the base model
    base = build_hf({**section, "lora": None}, [SEQ], 384)
    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))


def test_the_plan_counts_gradients_and_optimizer_states_for_the_adapters_alone(llama, tmp_path):
    from launcher.checks import load_for_run
    from launcher.plan import model_size
    from trainers.memory import plan_stage

    P, T = 1_000_000, 10_000
    assert plan_stage(0, P, 0, 1, "fp32", trainable=T).device_bytes == 4 * P + (4 + 8) * T
    assert plan_stage(2, P, 0, 4, "bf16", trainable=T).device_bytes == 2 * P + (2 + 12) * T // 4
    assert plan_stage(3, P, 0, 4, "bf16", trainable=T).device_bytes == (2 * P + (2 + 12) * T) // 4
    cfg, _ = load_for_run(_config(tmp_path, llama), [], None)
    params, _, trainable = model_size(cfg)
    assert (params, trainable) == (43_168 + 832, 832)


def test_setting_a_key_of_lora_turns_it_on_with_the_other_defaults(llama, tmp_path):
    from launcher.checks import load_for_run

    cfg, _ = load_for_run(_config(tmp_path, llama, lora=None), ["model.lora.r=4"], None)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (4, 16.0, "all-linear")


def _one_step_per_stage(rank: int, world: int, port: int, folder: str, results: str) -> None:
    import torch.distributed as dist

    from runconfig.schema import ModelConfig, TrainConfig
    from trainers import import_deepspeed
    from trainers.deepspeed_config import deepspeed_config
    from trainers.loop import _build
    from trainers.worker import WorkerConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed = import_deepspeed()
    found = {}
    for stage in range(4):
        torch.manual_seed(0)
        train = TrainConfig(workers=world, micro_batch_size=2, lr=1e-2, lr_schedule="constant", zero={"stage": stage})
        model = ModelConfig(type="hf", name_or_path=folder, seq_len=SEQ, lora=LORA)
        config = WorkerConfig(model=model, train=train, data={"task": "lm", "input_shape": [SEQ], "num_classes": 384,
                                                             "classes": None}, steps_per_epoch=1,
                              deepspeed=deepspeed_config(train, 32, 1), metric="val_loss", lr_path="train.lr",
                              ingest_memory_mb=None, shuffle_buffer=1)
        built, keep, _ = _build(config, model.model_dump(mode="json"))
        adapters = sum(p.numel() for p in built.parameters() if p.requires_grad)  # created after zero.Init: whole
        engine, *_ = deepspeed.initialize(model=built, model_parameters=[p for p in built.parameters() if p.requires_grad],
                                          config=config.deepspeed)
        local = {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).clone() for n, p in engine.module.named_parameters()}
        tokens = torch.randint(0, 384, (2, 17), generator=torch.Generator().manual_seed(rank))
        loss = torch.nn.functional.cross_entropy(engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        # The fp32 partitions ZeRO-3 (and ZeRO-1/2) optimize; the plain optimizer's own params at stage 0.
        flat = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
                or getattr(engine.optimizer, "single_partition_of_fp32_groups", None))
        optimized = (sum(t.numel() for t in flat) if flat is not None
                     else sum(p.numel() for g in engine.optimizer.param_groups for p in g["params"]))
        after = {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p.data) for n, p in engine.module.named_parameters()}
        frozen = [n for n, p in engine.module.named_parameters() if not p.requires_grad]
        found[stage] = {"optimized": optimized, "adapters": adapters,
                        "base_unchanged": all(torch.equal(local[n], after[n]) for n in frozen),
                        "adapters_moved": any(not torch.equal(local[n], after[n]) for n in after if n not in frozen)}
        del engine, built, keep
    Path(results, f"{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


def test_only_the_adapters_reach_the_optimizer_at_every_zero_stage(llama, tmp_path):
    """Two gloo ranks take one step at ZeRO-0, 1, 2 and 3: the optimizer holds the adapters (whole
    at stage 0, a partition each above it), the base weights stay as loaded, the adapters move."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_one_step_per_stage, args=(2, port, str(llama), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    adapters = ranks[0]["0"]["adapters"]
    assert adapters == 2 * 2 * ((32 + 32) + (32 + 16) + (64 + 32))  # layers x r x (in + out) of q, v and down
    for stage in "0123":
        for rank in ranks:
            assert rank[stage]["base_unchanged"] and rank[stage]["adapters_moved"], (stage, rank[stage])
        optimized = [rank[stage]["optimized"] for rank in ranks]
        if stage == "0":
            assert optimized == [adapters, adapters]
        else:  # each rank its partition, padded to the world size
            assert adapters <= sum(optimized) <= adapters + 64, (stage, optimized)


def _config(tmp_path: Path, llama: Path, lora: dict | None = LORA, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "python-stdlib", "text_glob": "logging/*.py", "instructions": {}, "pack": True,
                 "val_fraction": 0.1, "test_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
        "model": {"type": "hf", "name_or_path": str(llama), "seq_len": SEQ, "lora": lora},
        "train": {"workers": 2, "epochs": 1, "micro_batch_size": 4, "lr": 1e-2} | train,
        "output": {"dir": str(tmp_path / "run")}}))
    return path


@pytest.mark.ray
def test_a_lora_fine_tune_at_zero3_exports_the_merged_model_and_the_peft_adapter(llama, ray_address, tmp_path):
    """The merged folder loads with plain transformers, the adapter with PeftModel.from_pretrained
    on the base: both give the logits raylaunch's load_model gives; the checkpoints hold the
    adapters and their optimizer state, not the base model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainers.modeldir import load_model

    done = raylaunch("run", str(_config(tmp_path, llama, zero={"stage": 3})), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    exported = tmp_path / "run" / "models" / "teacher"
    spec = json.loads((exported / "model.json").read_text())
    assert spec["lora"]["r"] == 2 and spec["adapter"]["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model(exported)
    merged = AutoModelForCausalLM.from_pretrained(exported).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), exported / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        logits = ours(tokens)
        torch.testing.assert_close(merged(input_ids=tokens).logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapted(input_ids=tokens).logits, logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(input_ids=tokens).logits, logits, atol=1e-3)  # it did learn something
    adapters = sum(v.numel() for v in load_file(exported / "adapter" / "adapter_model.safetensors").values())
    base_params = sum(p.numel() for p in base.parameters())
    for checkpoint in (tmp_path / "run" / "ray" / "train").glob("checkpoint_*"):
        held = 0
        for state in (checkpoint / "deepspeed").rglob("*.pt"):
            held += sum(t.numel() for t in _tensors(torch.load(state, weights_only=False, map_location="cpu")))
        assert held <= 4 * adapters + 1024 < base_params, (held, adapters, base_params)  # weights, Adam's two moments


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@pytest.mark.ray
def test_a_sweep_searches_the_adapters_rank_and_scale(llama, ray_address, tmp_path):
    config = _config(tmp_path, llama, workers=1, zero={"stage": 2})
    values = yaml.safe_load(config.read_text())
    values["tune"] = {"enabled": True, "search": "grid", "scheduler": "fifo", "metric": "val_loss",
                      "space": {"model.lora.r": {"grid": [1, 4]}, "model.lora.alpha": {"grid": [4.0]}}}
    config.write_text(yaml.safe_dump(values))
    done = raylaunch("run", str(config), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    tune = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["tune"]
    assert sorted(t["model.lora.r"] for t in tune["trials"]) == [1, 4]
    best = min(tune["trials"], key=lambda t: t["val_loss"])
    exported = json.loads((tmp_path / "run" / "models" / "teacher" / "model.json").read_text())
    assert exported["lora"]["r"] == best["model.lora.r"] and exported["lora"]["alpha"] == 4.0
    adapter = json.loads((tmp_path / "run" / "models" / "teacher" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == best["model.lora.r"]


REFUSED = {
    "hf_config": ({"hf_config": LLAMA, "name_or_path": None},
                  "model.lora: adapters train on pretrained weights; give model.name_or_path instead of hf_config"),
    "gpt": ({"type": "gpt", "name_or_path": None}, "model.lora: only for model.type hf (got gpt)"),
    "rank": ({"lora": {"r": 0}}, "model.lora.r"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_lora_config_that_cannot_run_is_one_line_before_ray_starts(case, llama, tmp_path):
    change, line = REFUSED[case]
    path = _config(tmp_path, llama)
    values = yaml.safe_load(path.read_text())
    values["model"] = {k: v for k, v in (values["model"] | change).items() if v is not None}
    path.write_text(yaml.safe_dump(values))
    done = raylaunch("run", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert line in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()


def test_the_sft_lora_config_fine_tunes_adapters_on_stdlib_pairs_distils_and_quantizes(llama):
    """configs/sft-lora.yaml (its base, configs/hf-llama.yaml's export, swapped for a tiny Llama)."""
    from launcher.checks import load_for_run
    from launcher.plan import model_size

    root = Path(__file__).parent.parent
    cfg, stages = load_for_run(root / "configs" / "sft-lora.yaml", [f"model.name_or_path={llama}"], None)
    assert stages == ["preprocess", "train", "distill", "quantize", "evaluate"]
    assert cfg.data.format == "python" and cfg.data.pack and cfg.model.lora.r == 16
    assert cfg.distill.student.overrides == {"num_hidden_layers": 2} and cfg.distill.teacher_outputs == "precompute"
    params, _, trainable = model_size(cfg)
    assert 0 < trainable < params
