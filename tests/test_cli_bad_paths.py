"""Every command given a wrong path, a file it cannot read or a run directory where something else
belongs: one line naming it and the fix, exit 2, before any Ray starts or anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main

QUICKSTART = str(Path(__file__).parent.parent / "configs" / "quickstart.yaml")


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    run = tmp_path / "run"
    (run / "models" / "teacher").mkdir(parents=True)
    (run / "models" / "teacher" / "model.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    return {"missing": str(tmp_path / "missing.yaml"), "folder": str(tmp_path / "folder"),
            "binary": str(tmp_path / "binary.yaml"), "rows": str(tmp_path / "rows.csv"), "run": str(run)}


CASES = [
    (["run", "{missing}"], "missing.yaml: no such config file"),
    (["run", "{folder}"], "folder: a folder, not a config file"),
    (["run", "{binary}"], "binary.yaml: cannot read: 'utf-8' codec"),
    (["plan", "{folder}"], "folder: a folder, not a config file"),
    (["config", "show", "{missing}"], "missing.yaml: no such config file"),
    (["submit", "{binary}", "--address", "http://127.0.0.1:1"], "binary.yaml: cannot read"),
    (["predict", "{run}", "{rows}"], "run: not a model directory (no model.json); it is a run directory: "
                                         "give one of its models ({run}/models/teacher)"),
    (["predict", "{folder}", "{rows}"], "folder: not a model directory (no model.json); give a folder under RUN_DIR/models/"),
    (["run", QUICKSTART, "--set", "output.dir={run}"], "output.dir: {run} already exists and is not empty"),
    (["run", QUICKSTART, "--set", "output.dir={folder}", "--resume"], "--resume: {folder} holds no run to resume"),
    (["run", QUICKSTART, "--set", "data.source={missing}"], "data.source: no such file or folder"),
    (["run", QUICKSTART, "--set", "train.deepspeed_config={folder}"], "train.deepspeed_config:"),
    (["run", QUICKSTART, "--set", "train.deepspeed_config={binary}"], "train.deepspeed_config: "),
    (["stop", "raylaunch-x", "--address", "http://127.0.0.1:1"], "--address http://127.0.0.1:1: cannot connect"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_a_bad_path_is_one_line_and_exit_2(args, message, paths, capsys):
    code = main([a.format(**paths) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message.format(**paths) in err, err
    if args[0] != "run" or "data.source" not in args[-1]:
        assert len(err.splitlines()) == 1, err
