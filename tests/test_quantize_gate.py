"""The accuracy gate: a quantized model that loses more than quantize.max_drop fails the stage
with the numbers, and stays on disk, marked rejected in summary.json. And static_int8 where no C++
compiler is found: exported without its compiled program, saying why."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch._inductor.config
import yaml
from safetensors.torch import load_file, save_file

from launcher.cli import main
from trainers.quantize import gate, quality_drop, rejection

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_quality_drop_counts_points_or_relative_perplexity():
    assert abs(quality_drop({"accuracy": 0.95}, {"accuracy": 0.91}) - 0.04) < 1e-12
    assert quality_drop({"accuracy": 0.90}, {"accuracy": 0.92}) < 0  # a gain is never a drop
    assert abs(quality_drop({"accuracy": 0.4, "perplexity": 10.0}, {"accuracy": 0.4, "perplexity": 10.5}) - 0.05) < 1e-12


def test_the_gate_passes_a_drop_up_to_max_drop_and_its_error_names_each_rejected_model():
    assert gate({"accuracy": 0.75}, {"accuracy": 0.5}, 0.25) == ("accepted", 0.25)  # exactly the limit passes
    assert gate({"accuracy": 0.75}, {"accuracy": 0.5}, 0.2) == ("rejected", 0.25)
    assert gate({"accuracy": 0.5}, {"accuracy": 0.75}, 0.0) == ("accepted", -0.25)  # a gain
    assert gate({"accuracy": 0.3, "perplexity": 8.0}, {"accuracy": 0.3, "perplexity": 9.0}, 0.1) == ("rejected", 0.125)
    models = {"teacher-int8_dynamic": {"status": "accepted", "drop": 0.0, "accuracy": 0.75},
              "teacher-static_int8": {"status": "rejected", "drop": 0.25, "accuracy": 0.5}}
    assert rejection("teacher", {"accuracy": 0.75}, {"teacher-int8_dynamic": models["teacher-int8_dynamic"]}, 0.2) is None
    assert str(rejection("teacher", {"accuracy": 0.75}, models, 0.2)) == (
        "quantize.max_drop: teacher-static_int8 0.5000 (-25.0 points) against the fp32 teacher's test accuracy 0.7500, "
        "over the allowed 0.2; kept in models/ and marked rejected in summary.json. Raise quantize.max_drop, calibrate "
        "on more rows (quantize.calibration_rows) or choose another method")
    lm = {"student-int8_dynamic": {"status": "rejected", "drop": 0.125, "perplexity": 9.0}}
    assert "student-int8_dynamic 9.0000 (+12.5% perplexity) against the fp32 student's test perplexity 8.0000" in \
        str(rejection("student", {"perplexity": 8.0}, lm, 0.1))


def test_a_quantized_model_over_max_drop_fails_the_stage_and_is_kept_marked_rejected(ray_cluster, quickstart_cache, tmp_path,
                                                                                     capsys):
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["data"]["cache_dir"] = str(quickstart_cache)
    raw["model"] = {"type": "mlp", "width": 32, "depth": 1}
    raw["train"] |= {"workers": 1, "epochs": 1, "micro_batch_size": 64}
    raw["tune"] = {"enabled": False}
    raw["distill"] = {"enabled": False}
    raw["quantize"] = {"methods": ["int8_weight_only", "static_int8"], "max_drop": 0.02}
    raw["output"] = {"dir": str(tmp_path / "run")}
    config = tmp_path / "gate.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--stages", "preprocess,train"]) == 0

    # Make the trained teacher one that int8 cannot represent, without changing what it computes in
    # fp32: a huge weight on a pixel that is 0 in every digit (the top-left corner). Its row's int8
    # scale becomes so coarse that every other weight in the row rounds to 0.
    weights_file = tmp_path / "run" / "models" / "teacher" / "model.safetensors"
    weights = load_file(str(weights_file))
    weights["1.weight"][:, 0] = 1e4
    save_file(weights, str(weights_file))
    capsys.readouterr()

    # And no C++ compiler to be found: static_int8 is exported without its compiled program, saying why.
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        code = main(["run", str(config), "--stages", "preprocess,train,quantize,evaluate", "--resume"])
    out, err = capsys.readouterr()
    assert code == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rejected = summary["models"]["teacher-int8_weight_only"]
    assert summary["status"] == "failed" and summary["failed_stage"] == "quantize"
    assert rejected["status"] == "rejected" and rejected["drop"] > 0.5 and rejected["accuracy"] < 0.3
    # The numbers and the way out, in one line.
    assert "quantize.max_drop: teacher-int8_weight_only" in err and "against the fp32 teacher's test accuracy" in err
    assert "over the allowed 0.02" in err and "marked rejected" in err
    assert "quantize" not in summary["stages"]
    artifact = Path(rejected["path"])
    assert (artifact / "model.safetensors").is_file() and json.loads((artifact / "model.json").read_text())["quantization"]
    assert torch.isfinite(next(iter(load_file(str(artifact / "model.safetensors")).values())).float()).all()
    assert "teacher-int8_weight_only" in (tmp_path / "run" / "report.md").read_text()

    reason = "AOTInductor could not compile teacher-static_int8's program ("
    assert summary["models"]["teacher-static_int8"]["not_compiled"].startswith(reason)
    assert f"teacher-static_int8 not compiled: {reason}" in " ".join(out.split())
    assert {p.name for p in (tmp_path / "run" / "models" / "teacher-static_int8").iterdir()} == {"model.json", "model.safetensors"}
