"""The language model: a causal GPT, text packed into byte-token blocks, trained end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import data_meta
from launcher.cli import main
from trainers.models import build_model

LM = Path(__file__).parent.parent / "configs" / "lm.yaml"
TINY = {"type": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16, "dropout": 0.0}


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model(TINY, [16], 256).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY, [16], 256).train()
        model.activation_checkpointing = checkpointing
        tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_lm_config_trains_a_gpt_on_text_files(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", str(LM), "--set", f"output.dir={run_dir}", "--set", "data.text_glob=json/*.py",
                 "--set", "model.seq_len=32", "--set", "model.d_model=32", "--set", "model.n_layer=1",
                 "--set", "model.n_head=2", "--set", "train.epochs=4", "--set", "train.warmup_steps=5",
                 "--set", "train.checkpoint_every=20", "--set", "data.val_fraction=0.1", "--set", "data.test_fraction=0.1",
                 "--set", "train.activation_checkpointing=true",
                 # the final stage, token-level: a narrower GPT distilled from the teacher's stored
                 # top-16 logits per token, quantized two ways, each gated on relative perplexity
                 "--set", "distill.enabled=true", "--set", "distill.teacher_outputs=precompute", "--set", "distill.top_k=16",
                 "--set", "distill.student={type: gpt, n_layer: 1, n_head: 2, d_model: 16, seq_len: 32}",
                 "--set", "distill.epochs=2", "--set", "quantize.enabled=true",
                 "--set", "quantize.methods=[int8_dynamic, static_int8]", "--set", "quantize.max_drop=0.5",
                 # the reference program here; test_export runs a compiled language model
                 "--set", "quantize.compile=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    train = summary["stages"]["train"]
    assert train["tokens_per_s"] > 0
    # Uniform guessing over 256 byte values is perplexity 256; English-like source code is far below.
    assert train["val_perplexity"] < 30
    teacher = summary["models"]["teacher"]
    assert teacher["perplexity"] < 30 and teacher["accuracy"] > 0.2
    meta = data_meta(run_dir)
    assert meta["task"] == "lm" and meta["vocab_size"] == 256 and meta["files"] == 5
    deepspeed = json.loads((run_dir / "deepspeed.json").read_text())
    assert deepspeed["gradient_clipping"] == 1.0 and deepspeed["scheduler"]["type"] == "WarmupCosineLR"
    assert "test perplexity" in (run_dir / "report.md").read_text()

    assert "teacher outputs: top 16 logits per token for" in out
    student = summary["models"]["student"]
    # Two epochs of a 16-wide GPT: far from the teacher, far below uniform guessing's 256.
    assert student["params"] < teacher["params"] / 2 and student["perplexity"] < 128
    quantize = summary["stages"]["quantize"]
    assert set(quantize["baseline"]) == {"perplexity"}  # the gate compares perplexities
    for method in ("int8_dynamic", "static_int8"):
        quantized = summary["models"][f"student-{method}"]
        assert quantized["status"] == "accepted"
        assert quantized["drop"] == pytest.approx(quantized["perplexity"] / quantize["baseline"]["perplexity"] - 1, abs=1e-3)
    # The exported students continue text.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import json\n\n\ndef ")
    for name in ("student", "student-static_int8"):
        written = tmp_path / f"{name}.jsonl"
        assert main(["predict", str(run_dir / "models" / name), str(prompt), "--max-new-tokens", "12",
                     "--output", str(written)]) == 0
        assert len(json.loads(written.read_text())["generated"]) > 0
