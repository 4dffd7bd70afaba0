"""Hugging Face transformers models (`model.type: hf`): loaded from a folder the test saves, or built
from a config; their text tokenized with their own tokenizer in Ray Data tasks; trained under
DeepSpeed (ZeRO-3 built partitioned); exported as folders plain transformers loads and generates
from. The models are tiny and made here (tests/hf_models.py): nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import raylaunch
from test_deepspeed_json import HF_ZERO2, LLAMA_FACTORY_ZERO3_OFFLOAD
from hf_models import GPT2, LLAMA, save_custom_code_model, save_model, train_tokenizer

ROOT = Path(__file__).parent.parent
SEQ = 32


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama"), LLAMA)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("gpt2"), GPT2, seed=1)


def _section(folder: Path, **more) -> dict:
    from runconfig.schema import ModelConfig

    return ModelConfig(type="hf", name_or_path=str(folder), seq_len=SEQ, task="causal_lm", **more).model_dump(mode="json")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_folder_model_gives_the_logits_transformers_gives(name, request):
    from transformers import AutoModelForCausalLM

    from trainers.models import build_model

    folder = request.getfixturevalue(name)
    ours = build_model(_section(folder), [SEQ], 384).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 384, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(tokens), theirs(tokens).logits)


def test_the_plan_counts_parameters_from_the_config_alone(llama, tmp_path):
    """On the meta device, from config.json: a folder whose weights file is unreadable still counts."""
    from trainers.models import build_model, count_params

    real = count_params(build_model(_section(llama), [SEQ], 384))
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in llama.iterdir():
        (broken / file.name).write_bytes(b"not safetensors" if file.suffix == ".safetensors" else file.read_bytes())
    with torch.device("meta"):
        counted = build_model(_section(broken), [SEQ], 384, weights=False)
    assert count_params(counted) == real == 43_168
    assert all(p.device.type == "meta" for p in counted.parameters())


def test_dtype_and_attention_implementation_pass_through(llama):
    from trainers.models import build_model

    model = build_model(_section(llama, dtype="bfloat16", attn_implementation="eager"), [SEQ], 384)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.hf.config._attn_implementation == "eager"


def test_the_model_must_hold_the_tokenizer_and_the_sequence():
    from trainers.models import build_model

    built = {"type": "hf", "hf_config": {"model_type": "llama", **{k: v for k, v in LLAMA.items() if k != "model_type"},
                                         "vocab_size": 300}, "seq_len": SEQ}
    with pytest.raises(ValueError, match=r"^model.hf_config.vocab_size: 300 embeddings but the tokenizer has 384 tokens"):
        build_model(built, [SEQ], 384, weights=False)
    long = {**built, "hf_config": {**built["hf_config"], "vocab_size": 384}, "seq_len": 128}
    with pytest.raises(ValueError, match=r"^model.seq_len: 128 tokens but the model has 64 positions"):
        build_model(long, [128], 384, weights=False)


def test_the_cache_key_follows_the_tokenizer_not_its_folder(llama, tmp_path):
    import shutil

    from dataprep.cache import cache_key
    from dataprep.sources import data_files
    from dataprep.text import HfTokenizer
    from runconfig.schema import DataConfig

    data = DataConfig(source="python-stdlib", format="text", text_glob="json/*.py").model_dump(mode="json")
    files = data_files(data)
    copy = shutil.copytree(llama, tmp_path / "copy")
    key = cache_key(data, SEQ, files, HfTokenizer(str(llama)))
    assert cache_key(data, SEQ, files, HfTokenizer(str(copy))) == key
    train_tokenizer(tmp_path / "other", vocab_size=400)
    assert cache_key(data, SEQ, files, HfTokenizer(str(tmp_path / "other"))) != key  # another vocabulary
    config = json.loads((copy / "tokenizer_config.json").read_text())
    # the same vocabulary, another end-of-text token between documents
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<pad>"}))
    assert cache_key(data, SEQ, files, HfTokenizer(str(copy))) != key
    assert cache_key(data, SEQ, files) != key  # raylaunch's own byte tokens


def test_each_document_ends_with_the_end_of_text_token(llama):
    from transformers import AutoTokenizer

    from dataprep.text import _pack

    tokenizer = AutoTokenizer.from_pretrained(llama)
    eos = tokenizer.eos_token_id

    def ids(text: bytes) -> list[int]:
        return tokenizer(text.decode(), add_special_tokens=False)["input_ids"]

    # Texts whose tokens, with an end token, fill whole blocks of 5 (4 inputs + 1 label): nothing dropped.
    texts = [b"".join(b"v%d = %d\n" % (i, i * i) for i in range(k)) for k in range(1, 40)]
    first = next(t for t in texts if len(ids(t)) % 5 == 0)
    last = next(t for t in texts if (len(ids(t)) + 1) % 5 == 0)
    batch = {"text": np.array([first, last], dtype=object), "key": np.arange(2, dtype=np.int64),
             "split": np.zeros(2, np.int8), "last": np.array([False, True])}  # a document's first piece, then a last one
    blocks = _pack(batch, 4, tokenizer.backend_tokenizer.to_str(), eos)["tokens"]
    assert blocks.flatten().tolist() == ids(first) + ids(last) + [eos]
    assert tokenizer.bos_token_id not in blocks  # no start token added to each piece


def _config(tmp_path: Path, model: dict, data: dict | None = None, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "python-stdlib", "format": "text", "text_glob": "json/*.py", "val_fraction": 0.1,
                 "test_fraction": 0.1, "cache_dir": str(tmp_path / "cache")} | (data or {}),
        "model": {"type": "hf", "seq_len": SEQ} | model,
        "train": {"workers": 2, "epochs": 2, "micro_batch_size": 8, "lr": 3e-3} | train,
        "output": {"dir": str(tmp_path / "run")}}))
    return path


REFUSED = {
    "no-tokenizer": ({"hf_config": LLAMA}, None, "model.tokenizer: a model built from model.hf_config needs a tokenizer: "
                     "a folder in model.tokenizer, or data.transforms [{type: tokenize, tokenizer: bpe}, pack] to train one"),
    "two-tokenizers": ({"name_or_path": "LLAMA"}, {"transforms": [{"type": "tokenize", "tokenizer": "bpe"}, "pack"]},
                       "data.transforms: tokenize sets tokenizer bpe, but the model's own tokenizer (LLAMA) tokenizes "
                       "its text; drop the option (or set model.tokenizer)"),
    "no-folder": ({"name_or_path": "./models/missing"}, None, "model.name_or_path: ./models/missing is no folder (nor a hub "
                  "id such as org/name); give a folder written by save_pretrained"),
    "distill": ({"name_or_path": "LLAMA"}, None, "distill.student: a transformers teacher distils into a transformers "
                "student that shares its tokenizer (got type cnn); set distill.student: {type: hf, overrides: "
                "{num_hidden_layers: 2}}, or distill.enabled: false"),
    "remote-code": ({"name_or_path": "CUSTOM"}, None, "model.trust_remote_code: CUSTOM brings its own model code "
                    "(auto_map in config.json), which runs only with model.trust_remote_code: true; set it if you trust "
                    "that code"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_config_the_model_cannot_run_is_one_line_before_ray_starts(case, llama, tmp_path):
    model, data, line = REFUSED[case]
    custom = save_custom_code_model(tmp_path / "custom") if case == "remote-code" else None
    model = {k: (str(llama) if v == "LLAMA" else str(custom) if v == "CUSTOM" else v) for k, v in model.items()}
    line = line.replace("CUSTOM", str(custom))
    config = _config(tmp_path, model, data)
    if case == "distill":
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump(raw | {"distill": {"enabled": True}}))
    done = raylaunch("run", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == line.replace("LLAMA", str(llama)), done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# The ZeRO-3 example of transformers' DeepSpeed docs: its ZeRO-2 example (every value "auto") with the
# ZeRO-3 block LLaMA-Factory's offload config also ships (optimizer and parameters offloaded to CPU).
TRANSFORMERS_ZERO3 = HF_ZERO2 | {"bf16": {"enabled": "auto"},
                                 "zero_optimization": LLAMA_FACTORY_ZERO3_OFFLOAD["zero_optimization"]}


@pytest.mark.ray
def test_a_llama_folder_trains_at_zero3_and_exports_a_folder_transformers_loads(llama, ray_address, tmp_path):
    """With transformers' own ZeRO-3 offload JSON (train.deepspeed_config), on 2 workers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.modeldir import load_model

    ds = tmp_path / "ds_config_zero3.json"
    ds.write_text(json.dumps(TRANSFORMERS_ZERO3))
    config = _config(tmp_path, {"name_or_path": str(llama)}, zero={"stage": 3}, deepspeed_config=str(ds))
    done = raylaunch("run", str(config), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    deepspeed = json.loads((tmp_path / "run" / "deepspeed.json").read_text())
    assert deepspeed["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert deepspeed["zero_optimization"]["reduce_bucket_size"] == 32 * 32  # "auto" from the model's hidden size
    assert "tokens of the model's tokenizer in blocks of 32" in done.stdout
    # distill and quantize do not take transformers models yet: a plain run leaves them out
    assert "(stages: preprocess, train, quantize, evaluate)" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    train = summary["stages"]["train"]
    assert train["zero_stage"] == 3 and train["val_perplexity"] < 384 / 2  # well below guessing among 384 tokens

    exported = tmp_path / "run" / "models" / "teacher"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "model.json"} <= \
        {p.name for p in exported.iterdir()}
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    ours, spec = load_model(exported)
    tokens = torch.randint(0, 384, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(tokens).logits, ours(tokens), atol=1e-5, rtol=0)
        # trained: not the weights it started from
        start = AutoModelForCausalLM.from_pretrained(llama).eval()
        assert not torch.allclose(start(tokens).logits, ours(tokens), atol=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert theirs.generation_config.eos_token_id == tokenizer.eos_token_id
    assert summary["models"]["teacher"]["params"] == 43_168

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import json\n")
    predicted = raylaunch("predict", str(exported), str(prompt), "--max-new-tokens", "12", "--output",
                           str(tmp_path / "out.jsonl"))
    assert predicted.returncode == 0 and predicted.stderr == "", predicted.stdout + predicted.stderr
    generated = json.loads((tmp_path / "out.jsonl").read_text())["generated"]
    inputs = tokenizer("import json\n", return_tensors="pt", add_special_tokens=False)
    expected = theirs.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert generated and generated == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.ray
def test_a_gpt2_from_hf_config_trains_on_its_own_bpe_and_exports_a_tokenizer(ray_address, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _config(tmp_path, {"hf_config": GPT2},
                     {"transforms": [{"type": "tokenize", "tokenizer": "bpe", "vocab_size": 320}, "pack"]},
                     workers=1, zero={"stage": 0})
    done = raylaunch("run", str(config), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    exported = tmp_path / "run" / "models" / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert len(tokenizer) == model.config.vocab_size == 320
    assert tokenizer.eos_token == "<|endoftext|>" and model.config.eos_token_id == tokenizer.eos_token_id == 0
    assert model.config.n_embd == 32 and model.config.n_layer == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["train"]["val_perplexity"] < 320 / 2
    ids = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 1


def _partitioned_build(rank: int, world: int, port: int, folder: str, results: str) -> None:
    import torch.distributed as dist

    from runconfig.schema import ModelConfig, TrainConfig
    from trainers.deepspeed_config import deepspeed_config
    from trainers.loop import _build
    from trainers.worker import WorkerConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    train = TrainConfig(workers=world, micro_batch_size=2, zero={"stage": 3})
    model = ModelConfig(type="hf", name_or_path=folder, seq_len=SEQ)
    config = WorkerConfig(model=model, train=train, data={"task": "lm", "input_shape": [SEQ], "num_classes": 384,
                                                         "classes": None}, steps_per_epoch=1,
                          deepspeed=deepspeed_config(train, 32, 1), metric="val_loss", lr_path="train.lr",
                          ingest_memory_mb=None, shuffle_buffer=1)
    built, keep, _ = _build(config, model.model_dump(mode="json"))
    params = list(built.parameters())
    Path(results, f"{rank}.json").write_text(json.dumps({
        "local": sum(p.numel() for p in params), "full": sum(p.ds_numel for p in params),
        "shard": sum(p.ds_tensor.numel() for p in params), "partitioned": all(hasattr(p, "ds_id") for p in params)}))
    dist.destroy_process_group()


def test_zero3_builds_a_transformers_model_partitioned(llama, tmp_path):
    """At ZeRO-3 no rank ever holds the whole model: each parameter is created partitioned."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_partitioned_build, args=(2, port, str(llama), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["partitioned"] and rank["local"] == 0 and rank["full"] == 43_168
        assert rank["shard"] <= 43_168 / 2 + 64  # its half (padded to a multiple of the world size per parameter)
    assert sum(r["shard"] for r in ranks) >= 43_168


def test_the_hf_llama_config_is_a_4m_llama_built_from_its_config():
    from launcher.checks import load_for_run
    from launcher.plan import model_size

    cfg, stages = load_for_run(ROOT / "configs" / "hf-llama.yaml", [], None)
    assert stages == ["preprocess", "train", "quantize", "evaluate"]
    params, _, _ = model_size(cfg)
    assert 3.5e6 < params < 4.5e6, params


@pytest.mark.ray
def test_a_sweep_searches_the_transformers_config_and_the_learning_rate(llama, ray_address, tmp_path):
    """Each trial builds its own architecture (model.hf_config.*) and trains it, on text tokenized
    with another folder's tokenizer (model.tokenizer); the best trial's model is the exported
    transformers folder, that tokenizer with it."""
    from transformers import AutoConfig, AutoTokenizer

    config = _config(tmp_path, {"hf_config": GPT2, "tokenizer": str(llama)}, workers=1, epochs=1)  # the Llama's tokenizer
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump(raw | {"tune": {
        "enabled": True, "search": "grid", "scheduler": "fifo", "metric": "val_loss",
        "space": {"model.hf_config.n_embd": {"grid": [16, 32]}, "train.lr": {"grid": [3e-3]}}}}))
    done = raylaunch("run", str(config), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    tune = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["tune"]
    assert sorted(t["model.hf_config.n_embd"] for t in tune["trials"]) == [16, 32]
    assert all(t["status"] == "completed" for t in tune["trials"])
    best = min(tune["trials"], key=lambda t: t["val_loss"])
    assert tune["best_values"]["model.hf_config.n_embd"] == best["model.hf_config.n_embd"]
    exported = AutoConfig.from_pretrained(tmp_path / "run" / "models" / "teacher")
    assert exported.n_embd == best["model.hf_config.n_embd"]
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "models" / "teacher")
    assert exported_tokenizer.get_vocab() == AutoTokenizer.from_pretrained(llama).get_vocab()


def test_the_export_carries_the_code_a_remote_code_model_was_loaded_with(llama, tmp_path):
    """The files behind the loaded classes travel, wherever transformers found them (a folder, or a
    hub repo whose auto_map points into another repo: `repo--module.Class` becomes `module.Class`)."""
    from transformers import AutoModelForCausalLM

    from trainers.models.hf import local_class_ref, remote_code_files

    custom = AutoModelForCausalLM.from_pretrained(save_custom_code_model(tmp_path / "custom"), trust_remote_code=True)
    assert [p.name for p in remote_code_files(custom)] == ["configuration_tinylm.py", "modeling_tinylm.py"]
    assert remote_code_files(AutoModelForCausalLM.from_pretrained(llama)) == []
    assert local_class_ref("org/code--modeling_x.X") == "modeling_x.X"
    assert local_class_ref(["org/code--tok.Slow", None]) == ["tok.Slow", None]
    assert local_class_ref("modeling_x.X") == "modeling_x.X"


@pytest.mark.ray
def test_a_model_with_its_own_code_trains_and_exports_its_code(ray_address, tmp_path):
    """trust_remote_code: the folder's Python files travel with the export, which loads as it is."""
    from transformers import AutoModelForCausalLM

    from trainers.modeldir import load_model

    custom = save_custom_code_model(tmp_path / "custom")
    config = _config(tmp_path, {"name_or_path": str(custom), "trust_remote_code": True}, workers=1, epochs=1,
                     zero={"stage": 0})
    done = raylaunch("run", str(config), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    exported = tmp_path / "run" / "models" / "teacher"
    assert {"configuration_tinylm.py", "modeling_tinylm.py"} <= {p.name for p in exported.iterdir()}
    theirs = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    ours, _ = load_model(exported)
    tokens = torch.randint(0, 384, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=tokens).logits, ours(tokens))
