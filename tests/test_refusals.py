"""What a user sees when raylaunch refuses a run or its data, the way they see it: the CLI in a
process of its own, stdout and stderr both (Ray's and DeepSpeed's loggers write there, which an
in-process capture misses), once under a pseudo-terminal. Only raylaunch's own lines are printed,
and a run refused or failed before any stage finished leaves nothing behind: the corrected
command runs into the same output.dir."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """A table with a value that is not a number, a corrupt Parquet file beside a good one, two CSV
    files whose columns disagree, an image folder with a file that is no image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-data")
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"f1": rng.random(200), "f2": rng.random(200), "label": np.arange(200) % 2})
    text = table.astype({"f1": object})
    text.loc[17, "f1"] = "abc"
    text.to_csv(root / "nonnumeric.csv", index=False)
    (root / "parquet").mkdir()
    table.to_parquet(root / "parquet" / "a.parquet")
    (root / "parquet" / "b.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    (root / "columns").mkdir()
    table.to_csv(root / "columns" / "a.csv", index=False)
    table.rename(columns={"f2": "g2"}).to_csv(root / "columns" / "b.csv", index=False)
    for name in ("cat", "dog"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(root / "images" / name / f"{i}.png")
    (root / "images" / "cat" / "broken.png").write_bytes(b"\x89PNG, but not really")
    return root


def _config(tmp_path: Path, data: dict, model: str = "mlp", **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": data, "model": {"type": model, "width": 8, "depth": 1},
                                    "train": {"workers": 1, "epochs": 1} | train,
                                    "output": {"dir": str(tmp_path / "run")}}))
    return path


def _raylaunch(config: Path, *more: str, address: str | None = None) -> subprocess.CompletedProcess:
    joined = ["--set", f"cluster.address={address}"] if address else []
    return subprocess.run([sys.executable, "-m", "launcher", "run", str(config), *more, *joined],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _own_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip()]


# (data, the line, the fix whose rerun into the same output.dir runs: one case carries the rerun,
# the others show their own line only)
CASES = {
    "nonnumeric": ({"source": "nonnumeric.csv"}, "nonnumeric.csv, row 18: column 'f1': 'abc' is not a number; fix the "
                   "data, or set data.on_bad_rows: skip to drop such rows", {"on_bad_rows": "skip"}),
    "corrupt-parquet": ({"source": "parquet"}, "parquet/b.parquet: not a readable Parquet file (", None),
    "columns-disagree": ({"source": "columns"}, "columns/b.csv: its columns differ from the first file's (missing f2; "
                         "extra g2); make the files' schemas agree or list data.feature_columns", None),
    "unreadable-image": ({"source": "images", "format": "images"}, "images/cat/broken.png: not a readable image "
                         "(UnidentifiedImageError: cannot identify image file); fix the data, or set "
                         "data.on_bad_rows: skip to drop such rows", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_and_leaves_nothing(case, bad_data, ray_address, tmp_path):
    data, message, fix = CASES[case]
    data = {k: (str(bad_data / v) if k == "source" else v) for k, v in data.items()}
    model = "cnn" if data.get("format") == "images" else "mlp"
    done = _raylaunch(_config(tmp_path, data, model), "--stages", "preprocess", address=ray_address)
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"{bad_data}/{message}"), done.stderr
    lines = _own_lines(done.stdout)
    assert len(lines) == 2 and lines[0].startswith("raylaunch: ") and lines[1].startswith("✗ preprocess failed after"), \
        done.stdout
    assert not (tmp_path / "run").exists()
    if fix is None:
        return

    fixed = data | {k: (str(bad_data / v) if k == "source" else v) for k, v in fix.items()}
    again = _raylaunch(_config(tmp_path, fixed, model), "--stages", "preprocess", address=ray_address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stderr == "" and "✓ preprocess" in again.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "succeeded"


REFUSALS = {
    "workers": (["--set", "train.workers=64"], "train.workers: 64 workers need 64 CPU but the Ray cluster has 2 CPU "
                "(short by 62 CPU); lower train.workers or train.cpus_per_worker, or add nodes", ["--set", "train.workers=1"]),
    "zero-auto": (["--set", "train.zero.stage=auto", "--set", "cluster.worker_memory_gb=0.00001"],
                  "train.zero.stage: no ZeRO stage fits 117,898 parameters in 0.01 MiB per worker "
                  "(cluster.worker_memory_gb);", ["--set", "train.zero.stage=auto"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_run_leaves_nothing_and_the_fixed_rerun_runs(case, ray_address, quickstart_cache, tmp_path):
    refused, message, fix = REFUSALS[case]
    common = ["--set", f"output.dir={tmp_path / 'run'}", "--set", f"data.cache_dir={quickstart_cache}",
              "--set", "tune.enabled=false", "--set", "train.epochs=1"]
    done = _raylaunch(QUICKSTART, "--stages", "preprocess,train", *common, *refused, address=ray_address)
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr
    assert _own_lines(done.stdout) == [f"raylaunch: {QUICKSTART} -> {tmp_path / 'run'}  (stages: preprocess, train)"], done.stdout
    assert not (tmp_path / "run").exists()

    again = _raylaunch(QUICKSTART, "--stages", "preprocess", *common, *fix, address=ray_address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stderr == "" and "✓ preprocess" in again.stdout


def test_bad_data_under_a_terminal_shows_only_raylaunchs_lines(bad_data, tmp_path):
    """In a terminal: the progress display, then the failed stage and the one line; nothing of Ray's,
    on the embedded Ray a plain `raylaunch run` starts."""
    config = _config(tmp_path, {"source": str(bad_data / "nonnumeric.csv")})
    pid, fd = pty.fork()
    if pid == 0:  # the child: raylaunch on the terminal's both streams
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "launcher", "run", str(config)])
    output, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 2, output.decode(errors="replace")[-3000:]
    # What stays on the screen: the last state of each line the display redrew in place.
    screen = [line.split("\r")[-1] if line.split("\r")[-1].strip() else next(
        (part for part in reversed(line.split("\r")) if part.strip()), "")
        for line in ANSI.sub("", output.decode()).split("\n")]
    text = [line.strip() for line in screen if line.strip() and "━" not in line]
    assert text[0].startswith("raylaunch: "), text
    body = text[1:]
    assert body == ["✗ preprocess failed after " + body[0].split("after ")[1],
                    f"{bad_data}/nonnumeric.csv, row 18: column 'f1': 'abc' is not a number; fix the data, or set "
                    "data.on_bad_rows: skip to drop such rows"], text
    assert not (tmp_path / "run").exists()
