"""Your own model (`model.type: python`): a builder and a loss named by import path, imported from
the working directory, trained, quantized and run by `raylaunch predict` like raylaunch's own;
a path that does not import or a builder that returns no module is one line before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent

MODULE = textwrap.dedent('''
    import math

    import torch.nn.functional as F
    from torch import nn


    def build(model, input_shape, num_classes):
        hidden = model["options"]["hidden"]
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.Tanh(),
                             nn.Linear(hidden, num_classes))


    def tenfold(logits, targets):
        return 10 * F.cross_entropy(logits, targets)


    def not_a_module(model, input_shape, num_classes):
        return "a string"


    def needs_an_option(model, input_shape, num_classes):
        return nn.Linear(model["options"]["width"], num_classes)
''')


@pytest.fixture
def project(tmp_path) -> Path:
    """A working directory holding the user's package, as `raylaunch run` would be started in."""
    (tmp_path / "mynets").mkdir()
    (tmp_path / "mynets" / "__init__.py").write_text("")
    (tmp_path / "mynets" / "tabular.py").write_text(MODULE)
    return tmp_path


def _config(project: Path, **model) -> Path:
    path = project / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "sklearn:digits", "cache_dir": str(project / "cache")},
        "model": {"type": "python", "builder": "mynets.tabular:build", "options": {"hidden": 24}} | model,
        "train": {"workers": 2, "epochs": 2, "micro_batch_size": 32},
        "distill": {"enabled": False}, "quantize": {"methods": ["int8_dynamic"], "max_drop": 0.5},
        "output": {"dir": str(project / "run")}}))
    return path


def _raylaunch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # The console script, as a user runs it: its own folder is on its path, not the working directory.
    return subprocess.run([str(Path(sys.executable).parent / "raylaunch"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.ray
def test_a_module_in_the_working_directory_trains_quantizes_and_predicts(project, ray_address):
    done = _raylaunch(project, "run", str(_config(project, loss="mynets.tabular:tenfold")), "--set",
                      f"cluster.address={ray_address}")
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    summary = json.loads((project / "run" / "summary.json").read_text())
    train = summary["stages"]["train"]
    # trained with the user's loss: ten times the cross-entropy the validation reports
    assert train["train_loss"] > 4 * train["val_loss"]
    assert train["val_accuracy"] > 0.5
    teacher = summary["models"]["teacher"]
    assert teacher["params"] == 64 * 24 + 24 + 24 * 10 + 10
    assert summary["models"]["teacher-int8_dynamic"]["status"] == "accepted"

    rows = project / "rows.csv"
    columns = json.loads((project / "run" / "models" / "teacher" / "model.json").read_text())["preprocess"]["feature_columns"]
    rows.write_text(",".join(columns) + "\n" + ",".join(["0"] * len(columns)) + "\n")
    predicted = _raylaunch(project, "predict", str(project / "run" / "models" / "teacher-int8_dynamic"), str(rows))
    assert predicted.returncode == 0 and predicted.stderr == "" and "row 1" in predicted.stdout, predicted.stdout + predicted.stderr


REFUSED = {
    "no-module": ({"builder": "mynetz.tabular:build"}, "model.builder: 'mynetz.tabular:build' does not import "
                  "(ModuleNotFoundError: No module named 'mynetz'); make mynetz.tabular importable from the working "
                  "directory (PROJECT)"),
    "no-function": ({"loss": "mynets.tabular:focal"}, "model.loss: mynets.tabular has no function 'focal'"),
    "no-module-returned": ({"builder": "mynets.tabular:not_a_module"},
                           "model.builder: mynets.tabular:not_a_module returned str, not a torch.nn.Module"),
    "builder-raises": ({"builder": "mynets.tabular:needs_an_option"}, "model.builder: mynets.tabular:needs_an_option "
                       "raised KeyError: 'width' (building for input shape [1, 8, 8] and 10 classes)"),
    "not-a-path": ({"builder": "mynets/tabular.py"}, "model.builder: 'mynets/tabular.py' is not an import path; write "
                   "it as \"package.module:function\""),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_builder_that_cannot_build_is_one_line_before_ray_starts(case, project):
    model, line = REFUSED[case]
    done = _raylaunch(project, "run", str(_config(project, **model)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().endswith(line.replace("PROJECT", str(project))), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (project / "run").exists() and not (project / "cache").exists()
