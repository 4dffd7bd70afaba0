"""The same config run twice trains the same model: each run builds its own data cache (as on a
new machine, or after the cache was cleared), and the two end with bitwise-identical weights on
CPU, with the splits held in memory and streamed."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main

QUICKSTART = str(Path(__file__).parent.parent / "configs" / "quickstart.yaml")


@pytest.mark.parametrize("in_memory", [True, False], ids=["held", "streamed"])
def test_two_fresh_runs_of_one_config_train_bitwise_identical_weights(ray_cluster, tmp_path, in_memory):
    weights = []
    for name in ("first", "second"):
        code = main(["run", QUICKSTART, "--stages", "preprocess,train", "--set", f"output.dir={tmp_path / name}",
                     "--set", f"data.cache_dir={tmp_path / f'cache-{name}'}", "--set", "tune.enabled=false",
                     "--set", "model={type: mlp, width: 16, depth: 1, dropout: 0.1}", "--set", "train.epochs=1",
                     "--set", "train.micro_batch_size=64", "--set", f"data.in_memory={str(in_memory).lower()}"])
        assert code == 0
        weights.append((tmp_path / name / "models" / "teacher" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
