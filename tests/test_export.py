"""Exports: every quantization method's model round-trips through its files, `load_model` loads
each kind, and `raylaunch predict` runs each on raw input (table rows, images, text). The models
are trained here with a few hundred plain PyTorch steps: what is under test is the export, not
training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from launcher.cli import main
from runconfig.schema import ModelConfig
from trainers.modeldir import (PROGRAM, WEIGHTS, CompiledProgram, load_model, load_quantized_dir, model_spec,
                               quantize_model_dir, save_model_dir)
from trainers.models import build_model
from trainers.quantize import METHODS, unsupported_reason

COLUMNS = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 600) -> torch.nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        index = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return model.eval()


def _spec(model: dict, feature_columns, shape, normalize: dict) -> dict:
    meta = {"input_shape": shape, "num_classes": 10, "classes": list(range(10)), "task": "classify", "format": "csv",
            "feature_columns": feature_columns, "stored_shape": shape, "normalize": normalize, "augment": [], "seed": 0}

    return model_spec(model, meta)


@pytest.fixture(scope="module")
def digits():
    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    """A CNN trained on digits given as 64 feature columns (0-16), standardized, exported as fp32
    and by every quantization method this machine can run (static_int8 with its compiled program)."""
    x, y = digits
    mean, std = x[:1400].mean(0), x[:1400].std(0) + 1e-6
    # as the preprocess stage stores them: one statistic per feature, in the stored shape
    normalize = {"method": "standardize", "per": "feature", "shift": mean.reshape(1, 8, 8).tolist(),
                 "scale": std.reshape(1, 8, 8).tolist()}
    model_cfg = ModelConfig(type="cnn", width=8, depth=2).model_dump()
    torch.manual_seed(0)
    model = build_model(model_cfg, [1, 8, 8], 10)
    inputs = torch.from_numpy((x - mean) / std).view(-1, 1, 8, 8)
    _train(model, inputs[:1400], torch.from_numpy(y[:1400]))
    root = tmp_path_factory.mktemp("models")
    save_model_dir(root / "student", model.state_dict(), _spec(model_cfg, COLUMNS, [1, 8, 8], normalize))
    dirs = {"fp32": root / "student"}
    for method in METHODS:
        if unsupported_reason(method) is None:
            quantize_model_dir(root / "student", root / method, method, calibration=inputs[1400:1600], compile=True)
            dirs[method] = root / method
    return dirs, inputs, y


def test_each_quantized_export_loads_and_stays_close_to_fp32(exported):
    dirs, inputs, y = exported
    fp32, _ = load_model(dirs["fp32"])
    test = inputs[1600:]
    with torch.inference_mode():
        reference = fp32(test)
        accuracy = (reference.argmax(-1).numpy() == y[1600:]).mean()
        assert accuracy > 0.9
        for method, directory in dirs.items():
            model, spec = load_model(directory)
            out = model(test)
            assert (out.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95, method
            assert (out - reference).abs().max() < 0.15 * reference.abs().max(), method
            if method != "fp32":
                assert spec["quantization"]["method"] == method and spec["format"] in ("torchao", "pt2e")
    fp32_bytes = (dirs["fp32"] / WEIGHTS).stat().st_size
    # PT2E quantizes the convolutions too: the whole model is int8.
    assert (dirs["static_int8"] / WEIGHTS).stat().st_size < fp32_bytes / 2.5
    assert (dirs["int8_dynamic"] / WEIGHTS).stat().st_size < fp32_bytes


def test_a_compiled_program_runs_where_it_was_compiled_and_the_reference_program_elsewhere(exported, tmp_path):
    """static_int8's model.pt2 (AOTInductor): loaded where model.json's CPU and torch match this
    machine, for any batch size, giving the reference program's classes; with another CPU or torch
    recorded, or the file gone, the reference program rebuilt from the tensors, saying why."""
    import shutil

    dirs, inputs, _ = exported
    test = inputs[1600:]
    model, spec = load_model(dirs["static_int8"], compiled=True)
    assert isinstance(model, CompiledProgram) and spec["program"] == PROGRAM == spec["compiled"]["file"]
    assert spec["compiled"]["bytes"] == (dirs["static_int8"] / PROGRAM).stat().st_size
    reference, _ = load_quantized_dir(dirs["static_int8"], compiled_program=False)
    assert not isinstance(reference, CompiledProgram)
    with torch.inference_mode():
        expected = reference(test)
        out = model(test)
        assert (out.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99
        assert (out - expected).abs().max() <= 0.01 * (expected.max() - expected.min())
        assert torch.allclose(model(test[:1]), out[:1], atol=1e-4) and model(test[:64]).shape == (64, 10)

    def copy_with(name: str, **compiled) -> Path:
        directory = tmp_path / name
        shutil.copytree(dirs["static_int8"], directory)
        spec = json.loads((directory / "model.json").read_text())
        spec["compiled"] |= compiled
        (directory / "model.json").write_text(json.dumps(spec))
        return directory

    here = spec["compiled"]
    cases = {copy_with("cpu", cpu="aarch64 neon"): f"{PROGRAM} was compiled for cpu aarch64 neon (here {here['cpu']})",
             copy_with("torch", torch="2.0.0"): f"{PROGRAM} was compiled for torch 2.0.0 (here {here['torch']})"}
    gone = copy_with("gone")
    (gone / PROGRAM).unlink()
    cases[gone] = f"{PROGRAM} is missing"
    for directory, why in cases.items():
        model, spec = load_model(directory, compiled=True)
        assert not isinstance(model, CompiledProgram) and spec["program"] == f"the reference program: {why}"
        with torch.inference_mode():
            assert torch.equal(model(test), expected)


def test_a_compiled_program_loads_only_when_asked_for(exported):
    """model.pt2 is machine code: `load_model` and `raylaunch predict` run the tensors unless told
    otherwise (`compiled=True`, `--compiled`)."""
    dirs, _, _ = exported
    model, spec = load_model(dirs["static_int8"])
    assert not isinstance(model, CompiledProgram)
    assert spec["program"] == f"the reference program: {PROGRAM} runs only when asked for (--compiled)"


@pytest.mark.parametrize("pointing", ["relative", "absolute", "symlink"])
def test_a_model_json_naming_a_program_outside_its_folder_is_refused_before_anything_loads(exported, digits, tmp_path,
                                                                                         monkeypatch, capsys, pointing):
    """A crafted model.json alone, whose program is another folder's model.pt2 (here a real
    package, as an attacker's would be), is refused in one line with exit 2, with or without
    --compiled, before any native code could load."""
    import shutil

    import torch._inductor

    dirs, _, _ = exported
    crafted, elsewhere = tmp_path / "crafted", tmp_path / "elsewhere" / PROGRAM
    shutil.copytree(dirs["static_int8"], crafted)
    elsewhere.parent.mkdir()
    (crafted / PROGRAM).rename(elsewhere)
    spec = json.loads((crafted / "model.json").read_text())
    named = {"relative": f"../elsewhere/{PROGRAM}", "absolute": str(elsewhere), "symlink": PROGRAM}[pointing]
    if pointing == "symlink":
        (crafted / PROGRAM).symlink_to(elsewhere)
    spec["compiled"]["file"] = named
    (crafted / "model.json").write_text(json.dumps(spec))

    def loaded(*args, **kwargs):
        raise AssertionError(f"a compiled program was loaded: {args}")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", loaded)
    rows = tmp_path / "rows.csv"
    x, _ = digits
    rows.write_text(",".join(COLUMNS) + "\n" + ",".join(f"{v:g}" for v in x[0]) + "\n")
    shown = named if pointing != "symlink" else f"{PROGRAM} -> {elsewhere}"
    for flags in ([], ["--compiled"]):
        assert main(["predict", str(crafted), str(rows), *flags]) == 2
        assert capsys.readouterr().err.strip() == (
            f"{crafted / 'model.json'}: compiled.file names {shown!r}, outside the model folder; a compiled program is "
            f"only ever {PROGRAM} in the folder itself: export the model again")


def test_nothing_is_unpickled_loading_or_predicting_any_export(exported, digits, tmp_path, monkeypatch, capsys):
    """`load_model` and `raylaunch predict` read safetensors and JSON only: with every way to unpickle
    made to fail, each export kind still loads and predicts."""
    import pickle

    def unpickled(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Unpickler:
        def __init__(self, *args, **kwargs):
            unpickled()

    real_load = torch.load

    def load_weights_only(*args, weights_only=None, **kwargs):
        if weights_only is not True:
            unpickled()
        return real_load(*args, weights_only=True, **kwargs)

    dirs, inputs, _ = exported
    x, _ = digits
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(COLUMNS) + "\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in x[1600:1610]) + "\n")
    with monkeypatch.context() as patch:
        for name, value in (("load", unpickled), ("loads", unpickled), ("Unpickler", Unpickler)):
            patch.setattr(pickle, name, value)
        patch.setattr(torch, "load", load_weights_only)
        for method, directory in dirs.items():
            model, _ = load_model(directory)
            with torch.inference_mode():
                assert model(inputs[:4]).shape == (4, 10), method
            assert main(["predict", str(directory), str(rows)]) == 0, method
    assert "row 10" in capsys.readouterr().out


def test_a_program_that_cannot_be_compiled_is_exported_without_it_saying_why(exported, tmp_path):
    """Without a C++ compiler AOTInductor cannot build model.pt2: the model is exported without a
    package (nothing half written), model.json says why in one line, and it loads as the reference
    program with that reason."""
    import torch._inductor.config

    dirs, inputs, _ = exported
    target = tmp_path / "static_int8"
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        quantize_model_dir(dirs["fp32"], target, "static_int8", calibration=inputs[1400:1600], compile=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.json", WEIGHTS]  # no package, no temporary file
    model, spec = load_model(target)
    reason = spec["not_compiled"]
    assert reason.startswith("AOTInductor could not compile static_int8's program (") and "\n" not in reason
    assert "No working C++ compiler" in reason and "install g++" in reason and "quantize.compile: false" in reason
    assert "compiled" not in spec and spec["program"] == f"the reference program: {reason}"
    assert not isinstance(model, CompiledProgram)
    with torch.inference_mode():
        reference, _ = load_quantized_dir(dirs["static_int8"], compiled_program=False)
        assert torch.equal(model(inputs[1600:]), reference(inputs[1600:]))


def test_only_a_missing_compiler_or_kernel_is_taken_for_one(exported, tmp_path, monkeypatch):
    """A failure that is not "no C++ compiler" (compiling) or "no kernel in this build" (probing a
    method) is a bug: it is raised, failing the quantize stage with its reason, not turned into an
    export without its program or a method skipped."""
    import torch._inductor
    import torchao.quantization

    dirs, inputs, _ = exported

    def broken(*args, **kwargs):
        raise ValueError("a bug in the program")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(ValueError, match="a bug in the program"):
        quantize_model_dir(dirs["fp32"], tmp_path / "static_int8", "static_int8", calibration=inputs[1400:1600], compile=True)
    assert not (tmp_path / "static_int8" / "model.json").exists() and not (tmp_path / "static_int8" / PROGRAM).exists()

    def failing(*args, **kwargs):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(torchao.quantization, "quantize_", failing)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        unsupported_reason("int8_dynamic")


def test_int4_runs_or_is_skipped_with_its_reason():
    reason = unsupported_reason("int4_weight_only")
    if reason is not None:  # this CPU build: torchao's int4 kernels need a package it cannot import
        assert reason.startswith("torchao ") and "cannot run it on this CPU: " in reason
    assert unsupported_reason("static_int8") is None and unsupported_reason("int8_dynamic") is None


def test_predict_reads_table_rows_with_each_export(exported, digits, tmp_path, capsys):
    """Raw feature values in a CSV, normalized by predict as in training: the same classes as the
    model gives for the preprocessed rows."""
    dirs, inputs, y = exported
    x, _ = digits
    rows = tmp_path / "rows.csv"
    header = ",".join(COLUMNS)
    rows.write_text(header + "\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in x[1600:1700]) + "\n")
    for (method, directory), compiled in [(item, False) for item in dirs.items()] + [(("static_int8", dirs["static_int8"]), True)]:
        out = tmp_path / f"{method}-{compiled}.jsonl"
        assert main(["predict", str(directory), str(rows), "--output", str(out), "--top-k", "2",
                     *(["--compiled"] if compiled else [])]) == 0, method
        predictions = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(predictions) == 100 and len(predictions[0]["top"]) == 2
        with torch.inference_mode():
            model, spec = load_model(directory, compiled=compiled)
            expected = model(inputs[1600:1700]).argmax(-1).tolist()
        assert isinstance(model, CompiledProgram) == compiled
        assert [p["class"] for p in predictions] == expected, method
        assert np.mean([p["class"] == label for p, label in zip(predictions, y[1600:1700])]) > 0.8, method
    assert "row 100" in capsys.readouterr().out


def test_predict_refuses_bad_input_in_one_line(exported, tmp_path, capsys):
    dirs, _, _ = exported
    missing = tmp_path / "few.csv"
    missing.write_text("pixel_0_0,other\n1,2\n")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    cases = [([str(dirs["fp32"]), str(missing)], "missing the feature column(s) pixel_0_1"),
             ([str(dirs["fp32"]), str(tmp_path / "nope.csv")], "no such file or folder"),
             ([str(not_a_model), str(missing)], "not a model directory (no model.json)"),
             ([str(dirs["fp32"]), str(not_a_model)], "no image files in the folder"),
             ([str(dirs["fp32"]), str(broken)], "broken.png: not a readable image")]
    for args, message in cases:
        assert main(["predict", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_predict_classifies_image_files(tmp_path, digits):
    """A model trained on 8x8 greyscale images (pixels 0-255) predicts PNG files read from a folder."""
    from PIL import Image

    x, y = digits
    pixels = (x * 255 / 16).round().astype(np.uint8).reshape(-1, 1, 8, 8)
    model_cfg = ModelConfig(type="cnn", width=8, depth=2).model_dump()
    torch.manual_seed(0)
    model = _train(build_model(model_cfg, [1, 8, 8], 10), torch.from_numpy(pixels[:1400]).float() / 255, torch.from_numpy(y[:1400]))
    spec = _spec(model_cfg, None, [1, 8, 8], {"method": "none"})
    save_model_dir(tmp_path / "model", model.state_dict(), spec)
    folder = tmp_path / "images"
    for i in range(1600, 1640):
        (folder / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, 0]).save(folder / str(y[i]) / f"{i}.png")
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(tmp_path / "model"), str(folder), "--output", str(out)]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(predictions) == 40
    assert np.mean([str(p["class"]) == p["input"].split("/")[0] for p in predictions]) > 0.85


def _save_lm(directory, ids: torch.Tensor, vocab: int, seq_len: int, tokenizer: str) -> torch.Tensor:
    """A one-layer GPT that learned the token stream `ids`, saved as the train stage saves one;
    returns its training windows."""

    model_cfg = ModelConfig(type="gpt", n_layer=1, n_head=2, d_model=32, seq_len=seq_len).model_dump()
    torch.manual_seed(0)
    model = build_model(model_cfg, [seq_len], vocab)
    windows = ids.unfold(0, seq_len + 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        batch = windows[torch.randint(0, len(windows), (32,))]
        optimizer.zero_grad()
        F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
    meta = {"input_shape": [seq_len], "num_classes": vocab, "classes": None, "task": "lm", "format": "text",
            "tokenizer": tokenizer, "vocab_size": vocab, "seq_len": seq_len, "augment": [], "seed": 0}
    save_model_dir(directory, model.eval().state_dict(), model_spec(model_cfg, meta))
    return windows


@pytest.mark.parametrize("method", [None, "int8_dynamic", "static_int8"])
def test_predict_continues_text_with_a_language_model(tmp_path, method, capsys):
    """A byte-level GPT that learned one repeated sentence continues it, exported as fp32 or quantized."""
    text = "the quick brown fox jumps over the lazy dog. " * 40
    windows = _save_lm(tmp_path / "fp32", torch.tensor(list(text.encode())), 256, 16, "bytes")
    directory = tmp_path / "fp32"
    if method:
        directory = tmp_path / method
        quantize_model_dir(tmp_path / "fp32", directory, method, calibration=windows[:64, :-1], compile=True)
        assert (directory / PROGRAM).exists() == (method == "static_int8")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox jumps over the ")
    assert main(["predict", str(directory), str(prompt), "--max-new-tokens", "9"]) == 0
    assert capsys.readouterr().out.startswith("lazy dog.")


def test_predict_uses_the_bpe_tokenizer_a_model_carries(tmp_path, capsys):
    """A BPE language model's folder holds its tokenizer.json; predict encodes and decodes with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "def add(a, b):\n    return a + b\n\n" * 60
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    _save_lm(tmp_path / "model", torch.tensor(tokenizer.encode(text).ids), tokenizer.get_vocab_size(), 8, "bpe")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def add(a, b):\n    return")
    assert main(["predict", str(tmp_path / "model"), str(prompt), "--max-new-tokens", "4"]) == 2  # no tokenizer.json yet
    assert "tokenizer.json) is missing" in capsys.readouterr().err
    tokenizer.save(str(tmp_path / "model" / "tokenizer.json"))
    assert main(["predict", str(tmp_path / "model"), str(prompt), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(" a + b")


def test_a_kept_model_carries_the_bpe_tokenizer_of_its_data(tmp_path):
    """The pipeline copies a checkpoint's model out of Ray's storage with the data's tokenizer.json
    (byte-level models have none), so predict can encode text for it."""
    from launcher.stages import keep_model

    checkpoint, data_dir = tmp_path / "checkpoint", tmp_path / "data"
    save_model_dir(checkpoint, {"w": torch.zeros(2)}, {"model": {}})
    data_dir.mkdir()
    assert not (keep_model(checkpoint, tmp_path / "models" / "bytes", data_dir) / "tokenizer.json").exists()
    (data_dir / "tokenizer.json").write_text("{}")
    kept = keep_model(checkpoint, tmp_path / "models" / "bpe", data_dir)
    assert sorted(p.name for p in kept.iterdir()) == ["model.json", "model.safetensors", "tokenizer.json"]
