"""The config front door: every bad input is one `path: problem` line and exit code 2, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import config as configuration
from launcher.cli import main

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"train": {"workers": 0}}, "train.workers: give a count of at least 1, or a range [min, max] with 1 <= min <= max (got 0)"),
        ({"train": {"workers": [1, 2, 3]}},
         "train.workers: give a count of at least 1, or a range [min, max] with 1 <= min <= max (got [1, 2, 3])"),
        ({"train": {"workers": [2, 4]}},
         "train.workers: [2, 4] may run 3 workers, which cannot share a step's 4 micro batches (4 x grad_accum_steps 1) "
         "evenly; set grad_accum_steps to a multiple of 3, or choose a range whose every count divides 4"),
        ({"train": {"zero": {"stage": 4}}}, "train.zero.stage: must be 0, 1, 2, 3 or 'auto' (got 4)"),
        ({"train": {"lr": -0.1}}, "train.lr: must be greater than 0 (got -0.1)"),
        ({"train": {"epochs": "many"}}, "train.epochs: must be a valid integer, unable to parse string as an integer (got 'many')"),
        ({"data": {"in_memory": "maybe"}}, "data.in_memory: must be 'auto', True or False (got 'maybe')"),
        ({"train": {"workers": 2, "micro_batch_size": 32, "global_batch_size": 100}},
         "train.global_batch_size: 100 must equal micro_batch_size x grad_accum_steps x workers = 32 x 1 x 2 = 64"),
        ({"train": {"precision": "bf16"}}, "train.precision: bf16 needs use_gpu: true (CPU workers train in fp32)"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"zero": {"stgae": 2}}}, "train.zero.stgae: unknown key (allowed: stage, offload_optimizer, offload_param)"),
        ({"tune": {"enabled": True}}, "tune.space: empty; add at least one path to search"),
        ({"tune": {"space": {"train.lrr": {"choice": [1]}}}}, "tune.space.train.lrr: value 1 is rejected: train.lrr: unknown key"),
        ({"tune": {"space": {"train.zero.stage": {"choice": [2, 5]}}}},
         "tune.space.train.zero.stage: value 5 is rejected: train.zero.stage: must be 0, 1, 2, 3 or 'auto' (got 5)"),
        ({"tune": {"space": {"train.lr": {"uniform": [0.1, 0.01]}}}}, "tune.space.train.lr: uniform needs low < high"),
        ({"tune": {"space": {"train.zero.stage": {"choice": [2, "auto"]}}}},
         "tune.space.train.zero.stage: auto is resolved once for the whole run, before any trial starts; list the stages"),
        ({"tune": {"search": "grid", "space": {"train.lr": {"uniform": [0.01, 0.1]}}}},
         "tune.space.train.lr: tune.search grid tries every value, so it needs choice or grid (got uniform)"),
        ({"tune": {"search": "optuna", "space": {"train.lr": {"grid": [0.01, 0.1]}}}},
         "tune.space.train.lr: Optuna samples each value itself; use choice instead of grid with tune.search optuna"),
        ({"tune": {"metric": "val_loss", "mode": "max", "space": {"train.lr": {"grid": [0.01]}}}},
         "tune.mode: val_loss is better when lower, so mode max would pick the worst trial; use min or leave it out"),
        ({"tune": {"space": {"train.zero.stage": {"grid": [2, 5]}}}},
         "tune.space.train.zero.stage: value 5 is rejected: train.zero.stage: must be 0, 1, 2, 3 or 'auto' (got 5)"),
        ({"tune": {"space": {"train.lr": {"grid": []}}}}, "tune.space.train.lr: grid needs at least one value"),
        ({"tune": {"time_budget_s": 0, "space": {"train.lr": {"grid": [0.1]}}}}, "tune.time_budget_s: must be greater than 0"),
        ({"tune": {"scheduler": "pbt", "space": {"model.width": {"choice": [8, 16]}}}},
         "tune.space.model.width: pbt continues trials from other trials' checkpoints, so it can only change train.lr, "),
        ({"tune": {"scheduler": "pbt", "search": "optuna", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}},
         "tune.search: pbt chooses its own values (it copies and perturbs the best trials'), so it needs search random"),
        ({"tune": {"space": {"distill.alpha": {"uniform": [0.1, 0.9]}, "train.lr": {"choice": [0.1]}}}},
         "tune.space: distill.alpha search the student and train.lr the teacher; a sweep trains one of them"),
        ({"tune": {"space": {"distill.temperature": {"choice": [2.0]}}}, "distill": {"enabled": False}},
         "tune.space: distill.temperature are searched by distilling students, but distill.enabled is false"),
        ({"tune": {"space": {"quantize.max_drop": {"choice": [0.1]}}}},
         "tune.space.quantize.max_drop: only paths under model, train, distill can be searched"),
        ({"data": {"transforms": [{"type": "random_crop", "size": [6, 6]}]}, "distill": {"teacher_outputs": "precompute"}},
         "distill.teacher_outputs: precompute stores one teacher output per row, but random_crop in data.transforms "
         "changes the rows every epoch; use live"),
        ({"quantize": {"methods": ["static_int8", "int8_dynamic", "static_int8"]}}, "quantize.methods: static_int8 listed twice"),
        ({"quantize": {"max_drop": 2}}, "quantize.max_drop: must be less than or equal to 1 (got 2)"),
        ({"data": {"transforms": ["flip", "standardize"]}},
         "data.transforms: standardize (entry 1) follows the augmentation flip (entry 0)"),
        ({"data": {"transforms": ["standardize", {"type": "random_crop", "size": [6, 6]}]}},
         "data.transforms: standardize per feature fits one statistic per pixel position, which random_crop moves every epoch; "
         "use {type: standardize, per: channel}"),
    ],
)
def test_bad_config_is_one_line_per_problem_and_exit_2(tmp_path, capsys, doc, expected):
    code = main(["run", str(_write(tmp_path, doc)), "--set", f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    doc = {"train": {"workers": 0, "zero": {"stage": 7}}, "model": {"type": "rnn"}}
    assert main(["run", str(_write(tmp_path, doc))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"train.workers", "train.zero.stage", "model.type"}


def test_cli_exit_code_2_without_traceback_in_a_real_process(tmp_path):
    bad = _write(tmp_path, {"train": {"zero": {"stage": 4}}})
    proc = subprocess.run([sys.executable, "-m", "launcher", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.zero.stage: must be 0, 1, 2, 3 or 'auto' (got 4)"


def test_set_overrides_are_typed_by_the_schema():
    cfg = configuration.load(QUICKSTART, ["train.lr=1e-3", "train.zero.stage=3", "data.image_shape=[1, 8, 8]",
                                          "tune.space.train.weight_decay={choice: [0.0, 0.01]}"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.zero.stage == 3
    assert cfg.data.image_shape == [1, 8, 8]
    assert cfg.tune.space["train.weight_decay"].choice == [0.0, 0.01]


def test_set_unknown_path_names_allowed_keys(capsys):
    assert main(["config", "show", str(QUICKSTART), "--set", "train.zero.stagee=1"]) == 2
    assert "train.zero.stagee: unknown key (allowed: stage, offload_optimizer, offload_param)" in capsys.readouterr().err


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", str(QUICKSTART), "--set", "train.epochs=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 3
    assert shown["train"]["zero"]["stage"] == 2
    assert configuration.validate(shown).train.epochs == 3


def test_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    assert main(["run", str(QUICKSTART), "--set", f"output.dir={run_dir}"]) == 2
    assert f"output.dir: {run_dir} already exists and is not empty" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("stages, expected", [
    ("preprocess,distill", "--stages: distill needs train or tune before it"),
    ("train", "--stages: must start with preprocess"),
    ("preprocess,trian", "--stages: unknown stage 'trian'"),
    ("preprocess,tune --set tune.space={distill.alpha:{choice:[0.5]}}", "--stages: tune needs train before it"),
    ("preprocess,train,tune,distill --set tune.space={distill.alpha:{choice:[0.5]}}",
     "--stages: tune.space searches distill paths, so the tune stage distills the student; leave distill out"),
])
def test_stage_lists_must_be_runnable(tmp_path, capsys, stages, expected):
    stages, *more = stages.split(" ")
    assert main(["run", str(QUICKSTART), "--stages", stages, "--set", f"output.dir={tmp_path / 'o'}", *more]) == 2
    assert expected in capsys.readouterr().err


def test_missing_data_file_and_config_file(tmp_path, capsys):
    assert main(["run", str(QUICKSTART), "--set", "data.source=nowhere/*.parquet", "--set", "model.type=mlp",
                 "--set", f"output.dir={tmp_path / 'o'}"]) == 2
    assert "data.source: no file or folder matches 'nowhere/*.parquet'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err


def test_default_stages_replace_train_with_tune_when_sweeping():
    cfg = configuration.load(QUICKSTART)
    assert cfg.default_stages() == ["preprocess", "tune", "distill", "quantize", "evaluate"]
    cfg = configuration.load(QUICKSTART, ["tune.enabled=false", "distill.enabled=false"])
    assert cfg.default_stages() == ["preprocess", "train", "quantize", "evaluate"]
    # Only distill paths searched: the sweep's trials are distillations of the trained teacher.
    cfg = configuration.load(QUICKSTART, ["tune.space={distill.temperature: {choice: [2.0, 4.0]}, distill.alpha: {uniform: [0.3, 0.9]}}"])
    assert cfg.sweeps_student and cfg.default_stages() == ["preprocess", "train", "tune", "quantize", "evaluate"]


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\nmodel: {type: cnn, type: mlp}\n"
                    "data:\n  transforms:\n    - {type: standardize, per: feature, per: channel}\n")
    assert main(["run", str(path), "--set", f"output.dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{path}: train.lr is given twice (lines 2 and 4); YAML would keep only the second, so remove one",
        f"{path}: model.type is given twice (both on line 5); YAML would keep only the second, so remove one",
        f"{path}: data.transforms[0].per is given twice (both on line 8); YAML would keep only the second, so remove one"]
    assert not (tmp_path / "out").exists()


def test_every_layer_reports_its_problems_in_the_same_pass(tmp_path):
    """A schema error no longer hides the DeepSpeed JSON's, the search space's, the data path's,
    the stages' and the key given twice: the user fixes them all from one run."""
    deepspeed = tmp_path / "ds.json"
    deepspeed.write_text('{"train_micro_batch_size_per_gpu": 16,')
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": str(tmp_path / "missing.csv")}, "model": {"type": "mlp"},
        "train": {"workers": 0, "deepspeed_config": str(deepspeed)},
        "tune": {"enabled": True, "space": {"model.width": {"choice": [16, 0]}}},
        "output": {"dir": str(tmp_path / "out")}}) + "quantize: {enabled: true}\nquantize: {enabled: false}\n")
    done = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--stages", "preprocess,distill"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    expected = [f"{path}: quantize is given twice",
                "train.workers: give a count of at least 1, or a range [min, max] with 1 <= min <= max (got 0)",
                f"train.deepspeed_config: {deepspeed} is not valid JSON",
                "tune.space.model.width: value 0 is rejected: model.width: must be greater than or equal to 1 (got 0)",
                f"data.source: no such file or folder '{tmp_path / 'missing.csv'}'",
                "--stages: distill needs train or tune before it"]
    assert len(lines) == len(expected), done.stderr
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)
    assert not (tmp_path / "out").exists()
