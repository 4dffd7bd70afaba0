"""Quantizing a transformers model (torchao int8 weight-only and dynamic, int4 weight-only where
this CPU build runs it): the export holds the quantized tensors with the folder's config and
tokenizer, and `load_model` rebuilds a model that gives the quantized model's logits. A tied
embedding and LM head (untied by quantizing the head) survive the round trip."""

from __future__ import annotations

import json

import pytest
import torch

from hf_models import LLAMA, save_model

SEQ = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama with tied embeddings, exported as training exports it (a transformers folder
    with model.json and its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runconfig.schema import ModelConfig
    from trainers.modeldir import model_spec, save_model_dir
    from trainers.models.hf import CausalLM

    folder = save_model(tmp_path_factory.mktemp("llama"), LLAMA | {"tie_word_embeddings": True})
    model = CausalLM(AutoModelForCausalLM.from_pretrained(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    section = ModelConfig(type="hf", name_or_path=str(folder), seq_len=SEQ).model_dump(mode="json")
    meta = {"task": "lm", "input_shape": [SEQ], "num_classes": len(tokenizer), "classes": None, "tokenizer": "model",
            "vocab_size": len(tokenizer), "seq_len": SEQ, "special_tokens": {"eos_token_id": tokenizer.eos_token_id}}
    target = tmp_path_factory.mktemp("export") / "teacher"
    save_model_dir(target, model.state_dict(), model_spec(section, meta), model)
    tokenizer.save_pretrained(target)
    return target


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only", "int4_weight_only"])
def test_a_quantized_transformers_export_reproduces_the_quantized_model(method, exported, tmp_path):
    from transformers import AutoTokenizer

    from trainers.modeldir import load_model, quantize_model_dir
    from trainers.quantize import unsupported_reason

    reason = unsupported_reason(method)
    if reason is not None:  # int4 alone may lack kernels on this CPU build: the stage skips it, saying why
        assert method == "int4_weight_only" and "cannot run it on this CPU" in reason, reason
        return
    tokens = torch.randint(0, 384, (3, SEQ), generator=torch.Generator().manual_seed(0))
    target = tmp_path / f"teacher-{method}"
    quantized = quantize_model_dir(exported, target, method, tokens)  # checks its own round trip too
    assert {"config.json", "tokenizer.json", "model.safetensors", "model.json"} <= {p.name for p in target.iterdir()}
    spec = json.loads((target / "model.json").read_text())
    assert spec["format"] == "torchao" and spec["quantization"]["method"] == method and "files" not in spec
    loaded, _ = load_model(target)
    fp32, _ = load_model(exported)
    with torch.inference_mode():
        expected = quantized(tokens)
        torch.testing.assert_close(loaded(tokens), expected, rtol=1e-4, atol=1e-5)
        assert not torch.equal(expected, fp32(tokens))  # it is quantized
        assert (expected - fp32(tokens)).abs().max() < 0.1 * fp32(tokens).abs().max()
    assert AutoTokenizer.from_pretrained(target).get_vocab() == AutoTokenizer.from_pretrained(exported).get_vocab()


def test_asking_static_int8_of_a_transformers_model_is_one_line_before_ray_starts(exported, tmp_path):
    import yaml

    from conftest import raylaunch

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "python-stdlib", "format": "text", "text_glob": "json/*.py"},
        "model": {"type": "hf", "name_or_path": str(exported), "seq_len": SEQ},
        "quantize": {"methods": ["int8_dynamic", "static_int8"]}, "output": {"dir": str(tmp_path / "run")}}))
    done = raylaunch("run", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert ("quantize.methods: static_int8 (a PT2E export of the whole model) does not take model.type hf; use "
            "int8_dynamic, int8_weight_only or int4_weight_only") in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()


def test_generation_speed_is_measured_at_batch_1_and_8_with_the_tokens_predict_generates(exported):
    """`greedy` (what the evaluate stage times) writes what `raylaunch predict` writes, for the
    fp32 and the int8 model alike, exactly `new_tokens` each."""
    from trainers.evaluate import generation_speed, greedy
    from trainers.modeldir import load_model
    from trainers.predict import generate

    fp32, spec = load_model(exported)
    rows = torch.randint(3, 384, (8, SEQ), generator=torch.Generator().manual_seed(1))
    ours = greedy(fp32, rows[:2, :10], 6)
    assert ours.shape == (2, 6)
    for row in range(2):
        expected = generate(fp32, spec, rows[row, :10], 6)
        assert ours[row].tolist()[: len(expected)] == expected  # predict stops at the end-of-text token
    speeds = generation_speed({"teacher": fp32}, rows, rounds=1)
    assert set(speeds["teacher"]) == {"gen_tokens_per_s_b1", "gen_tokens_per_s_b8"}
    assert all(v > 0 for v in speeds["teacher"].values())
