"""The stages' typed results: how the models a run made add up, and how a resumed run restores a
finished stage from what summary.json kept of it."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.pipeline import _interrupted
from launcher.stages import Models, Quantized, Trained


def test_the_final_model_is_the_student_where_one_was_distilled(tmp_path):
    teacher = Trained("teacher", tmp_path / "models" / "teacher", {})
    student = Trained("student", tmp_path / "models" / "student", {})
    assert Models() + None == Models()  # a stage the run does not take adds nothing
    trained = Models() + teacher
    assert trained.final is teacher and trained.dirs() == {"teacher": teacher.model_dir}
    distilled = trained + student
    assert distilled.final is student and list(distilled.dirs()) == ["teacher", "student"]
    # a sweep of the teacher replaces the trained one
    swept = Trained("teacher", tmp_path / "other", {"role": "teacher"})
    assert (distilled + swept).teacher is swept and (distilled + swept).student is student


def test_a_resume_restores_the_finished_stages_whose_models_are_still_there(tmp_path):
    quantized = {"teacher-int8_dynamic": {"method": "int8_dynamic", "status": "accepted", "drop": 0.0, "accuracy": 0.9,
                                          "path": str(tmp_path / "models" / "teacher-int8_dynamic")}}
    stages = {"preprocess": {"rows": {}}, "train": {"step": 8, "workers": 2},
              "tune": {"role": "student", "trials": []},
              "quantize": {"source": "teacher", "baseline": {"accuracy": 0.9}, "models": quantized, "skipped": {}},
              "evaluate": {}}
    (tmp_path / "summary.json").write_text(json.dumps({"stages": stages, "data_in_memory": {"train": True}}))
    for name in ("teacher", "teacher-int8_dynamic"):
        (tmp_path / "models" / name).mkdir(parents=True)
    finished, reads_before = _interrupted(tmp_path)
    # preprocessing and evaluation always run again; the sweep's student is gone, so it runs again too
    assert list(finished) == ["train", "quantize"] and reads_before == {"train": True}
    assert finished["train"] == Trained("teacher", tmp_path / "models" / "teacher", stages["train"])
    restored = finished["quantize"]
    assert isinstance(restored, Quantized) and restored.source == "teacher" and restored.test_metrics == {}
    assert restored.dirs() == {"teacher-int8_dynamic": Path(quantized["teacher-int8_dynamic"]["path"])}
    assert restored.models_record() == quantized and restored.models_record() is not restored.gated


def test_evaluation_lists_every_model_in_its_order_replacing_what_quantization_recorded():
    from launcher.pipeline import _add_models

    summary = {"models": {}}
    _add_models(summary, {"teacher-int8_dynamic": {"status": "accepted", "accuracy": 0.9}})
    _add_models(summary, {"teacher": {"accuracy": 0.91}, "teacher-int8_dynamic": {"status": "accepted", "accuracy": 0.9,
                                                                                    "latency_ms_p50": 0.4}})
    assert list(summary["models"]) == ["teacher", "teacher-int8_dynamic"]  # the fp32 model first, as evaluate has it
    assert summary["models"]["teacher-int8_dynamic"]["latency_ms_p50"] == 0.4
