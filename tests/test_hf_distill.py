"""Distilling a transformers teacher into a transformers student: the student is the teacher's
config with overrides, started from every k-th teacher layer (or fresh), on the teacher's
tokenizer; the teacher's top-k logits per token precomputed by Ray Data (packed rows with their
own position ids, the loss on the responses only) or run live by every worker. Tiny models made
here (tests/hf_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import raylaunch
from hf_models import GPT2, LLAMA, save_model

SEQ = 256
IGNORE = -100


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    """A 4-layer Llama: its 2-layer student keeps layers 0 and 2."""
    return save_model(tmp_path_factory.mktemp("llama4"), LLAMA | {"num_hidden_layers": 4, "max_position_embeddings": SEQ})


@pytest.fixture(scope="module")
def gpt2_4(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("gpt2"), GPT2 | {"n_layer": 4, "n_positions": SEQ}, seed=1)


def _derived(teacher: Path, target: Path, overrides: dict, init: str = "auto"):
    from trainers.models.hf_student import derive_student

    return derive_student({"type": "hf", "overrides": overrides, "init": init, "name_or_path": None, "hf_config": None},
                          teacher, target)


def test_a_student_keeps_every_kth_layer_of_its_teacher():
    from trainers.models.hf_student import kept_layers

    assert kept_layers(12, 6) == [0, 2, 4, 6, 8, 10]  # DistilBERT from BERT-base
    assert kept_layers(4, 2) == [0, 2]
    assert kept_layers(5, 2) == [0, 2]
    assert kept_layers(4, 3) == [0, 1, 2]
    assert kept_layers(4, 1) == [0]


@pytest.mark.parametrize("name", ["llama4", "gpt2_4"])
def test_a_derived_student_starts_from_the_teachers_embeddings_head_and_every_other_layer(name, request, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher_dir = request.getfixturevalue(name)
    section, copies = _derived(teacher_dir, tmp_path / "student", {"num_hidden_layers": 2})
    assert copies and section["name_or_path"] == str(tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    student = AutoModelForCausalLM.from_pretrained(section["name_or_path"])
    assert student.config.num_hidden_layers == 2
    layers = "model.layers" if name == "llama4" else "transformer.h"
    for key, value in student.state_dict().items():
        source = key.replace(f"{layers}.1.", f"{layers}.2.")
        assert torch.equal(value, teacher[source]), key
    # Not the teacher's layer 1 (a copy of the first two layers would pass the loop above for layer 0 only).
    second = next(k for k, v in student.state_dict().items() if k.startswith(f"{layers}.1.") and v.dim() == 2)
    assert not torch.equal(student.state_dict()[second], teacher[second])


def test_overrides_that_change_the_width_start_fresh_and_teacher_layers_then_is_refused(llama4, tmp_path):
    from transformers import AutoConfig

    section, copies = _derived(llama4, tmp_path / "auto", {"num_hidden_layers": 2, "hidden_size": 64})
    assert not copies and not list((tmp_path / "auto").glob("*.safetensors"))  # built from its config: fresh weights
    assert AutoConfig.from_pretrained(section["name_or_path"]).hidden_size == 64
    with pytest.raises(ValueError) as refused:
        # every weight of the teacher's shape, over other heads
        _derived(llama4, tmp_path / "asked", {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                             "head_dim": 16}, init="teacher_layers")
    assert str(refused.value) == ("distill.student.init: teacher_layers copies the teacher's weights, but the student's "
                                  "num_attention_heads is 2, the teacher's 4; change only num_hidden_layers in "
                                  "distill.student.overrides, or set init: fresh")
    _, copies = _derived(llama4, tmp_path / "fresh", {"num_hidden_layers": 2}, init="fresh")
    assert not copies


def test_per_layer_settings_follow_the_layers_the_student_keeps():
    from transformers import AutoConfig

    from trainers.models.hf_student import student_config

    kinds = ["sliding_attention", "full_attention"] * 2
    teacher = AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, use_sliding_window=True, sliding_window=16, layer_types=kinds)
    assert student_config(teacher, {"num_hidden_layers": 2}).layer_types == ["sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="distill.student.overrides: num_hidden_layer is not a setting of the teacher's "
                                         "qwen3 config; did you mean num_hidden_layers"):
        student_config(teacher, {"num_hidden_layer": 2})


@pytest.mark.parametrize("topk", [False, True])
def test_positions_labelled_ignore_count_in_neither_distillation_term(topk):
    from trainers.distill import distillation_loss, topk_distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(12, 50), torch.randn(12, 50)
    labels = torch.randint(0, 50, (12,))
    labels[[0, 3, 4, 11]] = IGNORE  # a prompt's tokens and a row's padding
    kept = labels != IGNORE

    def loss(s, t, y):
        if topk:
            values, indices = t.topk(8, dim=-1)
            return topk_distillation_loss(s, values, indices, y, temperature=2.0, alpha=0.5)
        return distillation_loss(s, t, y, temperature=2.0, alpha=0.5)

    masked = loss(student, teacher, labels)
    assert torch.allclose(masked, loss(student[kept], teacher[kept], labels[kept]), atol=1e-6)
    elsewhere = student.clone(), teacher.clone()
    elsewhere[0][~kept] += 5 * torch.randn(int((~kept).sum()), 50)
    elsewhere[1][~kept] -= 3.0
    assert torch.allclose(masked, loss(*elsewhere, labels), atol=1e-6)


def test_precomputed_teacher_outputs_of_packed_rows_read_each_examples_own_positions(llama4):
    from trainers.distill import TOPK_INDICES, TOPK_VALUES, TeacherOutputs
    from trainers.models.hf import load_hf

    teacher = load_hf(llama4)
    tokens = torch.randint(3, 300, (2, 17))
    positions = torch.cat([torch.arange(7), torch.arange(10)]).repeat(2, 1)  # two examples a row
    labels = torch.where(positions < 3, IGNORE, tokens)
    outputs = TeacherOutputs.__new__(TeacherOutputs)  # as the actor holds it, without a model directory to load
    outputs.model, outputs.meta, outputs.top_k = teacher, {"task": "lm"}, 4
    batch = {"tokens": tokens.numpy(), "labels": labels.numpy(), "positions": positions.numpy(),
             "key": torch.arange(2).numpy()}
    stored = outputs(batch)
    with torch.inference_mode():
        packed = teacher(tokens[:, :-1], positions[:, :-1]).topk(4, dim=-1)
        running = teacher(tokens[:, :-1]).topk(4, dim=-1)
    assert torch.allclose(torch.from_numpy(stored[TOPK_VALUES]), packed.values, atol=1e-5)
    assert torch.equal(torch.from_numpy(stored[TOPK_INDICES]).long(), packed.indices)
    assert not torch.allclose(torch.from_numpy(stored[TOPK_VALUES]), running.values, atol=1e-3)
    assert (stored["labels"] == labels.numpy()).all() and (stored["positions"] == positions.numpy()).all()


def _config(tmp_path: Path, teacher: Path, distill: dict, data: dict | None = None, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "python-stdlib", "format": "python", "text_glob": "logging/*.py", "instructions": {},
                 "pack": True, "val_fraction": 0.1, "test_fraction": 0.1, "cache_dir": str(tmp_path / "cache")}
        | (data or {}),
        "model": {"type": "hf", "name_or_path": str(teacher), "seq_len": SEQ},
        "train": {"workers": 1, "epochs": 1, "micro_batch_size": 8, "lr": 3e-3} | train,
        "distill": {"epochs": 2, "lr": 3e-3} | distill,
        "quantize": {"methods": ["int8_dynamic"], "max_drop": 0.5},
        "output": {"dir": str(tmp_path / "run")}}))
    return path


@pytest.mark.ray
def test_a_llama_fine_tuned_on_instructions_distils_into_two_of_its_layers_from_precomputed_outputs(
        llama4, ray_address, tmp_path):
    """Packed instruction rows: Ray Data actors store the teacher's top-k logits per token with the
    rows' positions and labels; the 2-layer student starts from layers 0 and 2, trains on them, and
    is quantized and evaluated with the teacher; its export is a plain transformers folder."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    distill = {"student": {"type": "hf", "overrides": {"num_hidden_layers": 2}}, "teacher_outputs": "precompute", "top_k": 8}
    done = raylaunch("run", str(_config(tmp_path, llama4, distill, zero={"stage": 3})), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    assert "teacher outputs: top 8 logits per token for" in done.stdout
    run = tmp_path / "run"
    stored = pq.read_table(run / "distill" / "teacher_outputs" / "train")
    assert {"tokens", "labels", "positions", "teacher_topk_values", "teacher_topk_indices"} <= set(stored.column_names)
    summary = json.loads((run / "summary.json").read_text())
    models = summary["models"]
    assert set(models) == {"teacher", "student", "student-int8_dynamic"}
    assert models["student"]["params"] < 0.75 * models["teacher"]["params"]
    assert 1 < models["student"]["perplexity"] < 384  # better than a guess over the vocabulary
    assert models["student"]["gen_tokens_per_s_b1"] > 0
    student = AutoModelForCausalLM.from_pretrained(run / "models" / "student")
    assert student.config.num_hidden_layers == 2
    spec = json.loads((run / "models" / "student" / "model.json").read_text())
    assert spec["model"]["overrides"] == {"num_hidden_layers": 2}


@pytest.mark.ray
def test_a_gpt2_distils_live_into_a_fresh_narrower_student_at_zero3_on_two_workers(gpt2_4, ray_address, tmp_path):
    """Every worker runs the frozen teacher on its batches (packed rows with their positions); the
    student, twice narrower, starts fresh and is built partitioned from its folder at ZeRO-3."""
    from transformers import AutoModelForCausalLM

    distill = {"student": {"type": "hf", "overrides": {"n_layer": 2, "n_embd": 16}}, "teacher_outputs": "live"}
    config = _config(tmp_path, gpt2_4, distill, workers=2, zero={"stage": 3})
    done = raylaunch("run", str(config), "--stages", "preprocess,train,distill,evaluate", address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["distill"]["zero_stage"] == 3
    student = AutoModelForCausalLM.from_pretrained(run / "models" / "student")
    assert (student.config.n_layer, student.config.n_embd) == (2, 16)
    assert 1 < summary["models"]["student"]["perplexity"] < 384


REFUSED = {
    "tokenizer": ({"student": {"type": "hf", "name_or_path": "OTHER"}}, "distill.student.name_or_path: the tokenizer of "
                  "OTHER is not the teacher's (its 320 tokens are not the teacher's 384: "),
    "override": ({"student": {"type": "hf", "overrides": {"num_layers": 2}}}, "distill.student.overrides: num_layers is not "
                 "a setting of the teacher's llama config; did you mean num_hidden_layers?"),
    "init": ({"student": {"type": "hf", "overrides": {"hidden_size": 64}, "init": "teacher_layers"}},
             "distill.student.init: teacher_layers copies the teacher's weights, but the student's model.embed_tokens.weight "
             "has shape (384, 64) and the teacher's model.embed_tokens.weight (384, 32); change only num_hidden_layers in "
             "distill.student.overrides, or set init: fresh"),
    "no student": ({"enabled": True}, "distill.student: a transformers teacher distils into a transformers student that "
                   "shares its tokenizer (got type cnn); set distill.student: {type: hf, overrides: {num_hidden_layers: 2}}, "
                   "or distill.enabled: false"),
    "seq_len": ({"student": {"type": "hf", "overrides": {"num_hidden_layers": 2}, "seq_len": 128}},
                "distill.student.seq_len: the student reads the teacher's rows of 256 tokens; drop it (it follows "
                "model.seq_len)"),
    "teacher's own": ({"student": {"type": "hf", "overrides": {}}, "TEACHER": {"overrides": {"num_hidden_layers": 2},
                                                                             "name_or_path": None, "tokenizer": "TOKENIZER"}},
                      "model.overrides: only a student derives from its teacher (distill.student.overrides); give the "
                      "model's own name_or_path or hf_config"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_student_that_cannot_learn_from_its_teacher_is_one_line_before_ray_starts(case, llama4, tmp_path):
    distill, line = REFUSED[case]
    other = save_model(tmp_path / "other", LLAMA | {"max_position_embeddings": SEQ}, vocab_size=320) \
        if case == "tokenizer" else None
    distill = json.loads(json.dumps(distill).replace("OTHER", str(other)).replace("TOKENIZER", str(llama4)))
    config = _config(tmp_path, llama4, distill)
    raw = yaml.safe_load(config.read_text())
    raw["model"] |= raw["distill"].pop("TEACHER", {})
    config.write_text(yaml.safe_dump(raw))
    done = raylaunch("run", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(line.replace("OTHER", str(other))), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_student_of_its_own_folder_on_the_teachers_tokenizer_is_accepted(llama4, tmp_path):
    import shutil

    from launcher.checks import load_for_run

    own = save_model(tmp_path / "own", LLAMA | {"max_position_embeddings": SEQ}, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the teacher's tokenizer, saved with the student
        shutil.copy(llama4 / name, own / name)
    config = _config(tmp_path, llama4, {"student": {"type": "hf", "name_or_path": str(own)}})
    cfg, stages = load_for_run(config, [], None)
    assert "distill" in stages and cfg.distill.student.name_or_path == str(own)


def test_a_transformers_teacher_without_a_student_is_not_distilled_by_default(llama4, tmp_path):
    from launcher.checks import load_for_run

    config = _config(tmp_path, llama4, {})
    raw = yaml.safe_load(config.read_text())
    raw.pop("distill")
    config.write_text(yaml.safe_dump(raw))
    _, stages = load_for_run(config, [], None)
    assert stages == ["preprocess", "train", "quantize", "evaluate"]


def test_a_transformers_student_needs_a_transformers_teacher():
    from launcher.checks import _student_problems
    from runconfig.schema import DistillConfig, ModelConfig

    student = {"type": "hf", "overrides": {"num_hidden_layers": 1}}
    problems = _student_problems(ModelConfig(type="gpt"), DistillConfig(student=student), True, None)
    assert problems == ["distill.student.type: a transformers student learns from a transformers teacher, whose "
                        "tokenizer it shares (got model.type gpt); choose a student of type gpt"]
