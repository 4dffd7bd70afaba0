"""A transformers model's checkpoints resume exactly, under ZeRO-2 and ZeRO-3 (built partitioned),
and LoRA's (the adapters and their optimizer state alone) at ZeRO-3: a
run stopped and started again (`--resume`: the same storage and name) and then losing a worker
mid-epoch (Ray Train restarts the group) ends bitwise where an uninterrupted one does."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from ray.train.v2.api.exceptions import TrainingFailedError
from safetensors.torch import load_file

from hf_models import LLAMA, save_model
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig
from trainers.fit import build_trainer, load_splits
from trainers.worker import Fault, worker_config

SEQ = 32


@pytest.fixture(scope="module")
def llama_text(ray_cluster, tmp_path_factory):
    """A Llama folder (attention dropout on: the RNG state matters) and json/*.py packed with its tokenizer."""
    from dataprep.cache import prepare
    from dataprep.text import HfTokenizer

    folder = save_model(tmp_path_factory.mktemp("llama"), LLAMA | {"attention_dropout": 0.1})
    data = RunConfig.model_validate({"data": {"source": "python-stdlib", "format": "text", "text_glob": "json/*.py",
                                              "val_fraction": 0.1, "test_fraction": 0.1}}).model_dump(mode="json")["data"]
    meta, out, _ = prepare(data, SEQ, tmp_path_factory.mktemp("cache"), hf=HfTokenizer(str(folder)))
    return folder, out, meta


LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1}  # dropout: the adapters draw from the RNG too


def _fit(llama_text, stage: int, storage, fault: Fault | None = None, max_failures: int = 0, lora: dict | None = None):
    folder, data_dir, meta = llama_text
    run = ResolvedConfig.of(RunConfig.model_validate({
        "data": {"format": "text", "source": "python-stdlib"},
        "model": {"type": "hf", "name_or_path": str(folder), "seq_len": SEQ, "lora": lora},
        # 613 blocks / 2 workers / 32 = 9 steps, a checkpoint every 3
        "train": {"workers": 2, "epochs": 1, "micro_batch_size": 32, "lr": 3e-3, "warmup_steps": 2,
                  "zero": {"stage": stage}, "checkpoint_every": 3, "keep_checkpoints": 100,
                  "max_failures": max_failures}}))
    config = worker_config(run, meta).replace(fault=fault)
    return build_trainer(config, load_splits(data_dir), storage, name="run").fit()


def _end(result) -> tuple[list, dict[str, torch.Tensor]]:
    """(step and train loss of every report, the last checkpoint's weights)."""
    reports = sorted((m["step"], m["train_loss"]) for _, m in result.best_checkpoints)
    last = max(result.best_checkpoints, key=lambda pair: pair[1]["step"])[0].path
    adapter = Path(last, "adapter_model.safetensors")  # LoRA: the checkpoint's model is the adapter
    return reports, load_file(adapter if adapter.exists() else f"{last}/model.safetensors")


@pytest.mark.parametrize("stage,lora", [(2, None), (3, None), (3, LORA)], ids=["zero2", "zero3", "zero3-lora"])
def test_a_transformers_model_resumes_bitwise_after_a_stopped_run_and_a_lost_worker(stage, lora, llama_text, tmp_path):
    fit = partial(_fit, lora=lora)
    reports, weights = _end(fit(llama_text, stage, tmp_path / "straight"))
    assert [step for step, _ in reports] == [3, 6, 9]

    # Stopped after step 4 (a worker lost, no restarts allowed: the run fails as if its driver had died).
    stopped = Fault(rank=0, step=4, where="step", marker=str(tmp_path / "stopped"))
    with pytest.raises(TrainingFailedError):
        fit(llama_text, stage, tmp_path / "run", stopped)
    # Run again into the same storage (--resume): it continues from step 3's checkpoint; a worker
    # killed after step 7 is then restarted by Ray Train from step 6's.
    killed = Fault(rank=1, step=7, where="step", marker=str(tmp_path / "killed"))
    again = _end(fit(llama_text, stage, tmp_path / "run", killed, max_failures=1))
    assert (tmp_path / "stopped").exists() and (tmp_path / "killed").exists()

    assert again[0] == reports  # every report's loss, exactly
    assert again[1].keys() == weights.keys()
    for name in weights:
        assert torch.equal(again[1][name], weights[name]), name
