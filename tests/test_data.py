"""Ray Data ingestion: every source format, image folders, the keyed split, fitted transforms, the
cache, and each kind of bad input (one clear line naming the file, exit 2, nothing half-written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataprep.stream import stream_split
from launcher.cli import main

pytestmark = pytest.mark.ray


def _cancer() -> pd.DataFrame:
    import sklearn.datasets

    bunch = sklearn.datasets.load_breast_cancer()
    frame = pd.DataFrame(bunch.data[:, :6], columns=[f"f{i}" for i in range(6)])
    frame["diagnosis"] = np.where(bunch.target == 1, "benign", "malignant")
    return frame


def _write(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)


def _data(source, **extra) -> dict:
    from runconfig.schema import DataConfig

    return DataConfig.model_validate({"source": source, "label_column": "diagnosis", **extra}).model_dump(mode="json")


def _preprocess(tmp_path, run: str, source, *more: str) -> int:
    """`raylaunch run --stages preprocess` on the quickstart config with a table source labelled
    `diagnosis`, into tmp_path/run, caching under tmp_path/cache; returns the exit code."""
    config = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
    return main(["run", str(config), "--stages", "preprocess", "--set", f"output.dir={tmp_path / run}",
                 "--set", f"data.source={source}", "--set", "model.type=mlp", "--set", "data.label_column=diagnosis",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", *more])


def _preprocess_stage(tmp_path, run: str) -> dict:
    return json.loads((tmp_path / run / "summary.json").read_text())["stages"]["preprocess"]


def _split(entry: Path, name: str) -> pd.DataFrame:
    frame = stream_split(entry, name).to_pandas()
    return frame.sort_values("key").reset_index(drop=True)


def test_parquet_csv_and_jsonl_give_the_same_splits(ray_cluster, tmp_path):
    from dataprep.cache import prepare

    frame = _cancer()
    halves = {"a": frame.iloc[:300], "b": frame.iloc[300:]}
    entries = {}
    for fmt, ext in (("parquet", "parquet"), ("csv", "csv"), ("jsonl", "jsonl")):
        for name, part in halves.items():
            _write(part, tmp_path / fmt / f"{name}.{ext}", fmt)
        source = str(tmp_path / fmt / f"*.{ext}") if fmt == "csv" else [str(tmp_path / fmt / f"a.{ext}"), str(tmp_path / fmt / f"b.{ext}")]
        meta, entry, reused = prepare(_data(source, transforms=["standardize"]), 128, tmp_path / "cache")
        assert not reused and meta["classes"] == ["benign", "malignant"] and meta["input_shape"] == [6]
        assert sum(meta["rows"].values()) == len(frame) and meta["files"] == 2
        entries[fmt] = entry
    for name in ("train", "val", "test"):
        parquet, csv, jsonl = (_split(entries[f], name) for f in ("parquet", "csv", "jsonl"))
        assert len(parquet) > 0
        for other in (csv, jsonl):
            assert (other["key"] == parquet["key"]).all() and (other["label"] == parquet["label"]).all()
            np.testing.assert_allclose(np.stack(other["features"]), np.stack(parquet["features"]), rtol=1e-5, atol=1e-5)


def test_a_file_uri_glob_reads_the_same_rows_as_the_local_path(ray_cluster, tmp_path):
    from dataprep.cache import prepare

    frame = _cancer()
    _write(frame.iloc[:300], tmp_path / "src" / "a.parquet", "parquet")
    _write(frame.iloc[300:], tmp_path / "src" / "b.parquet", "parquet")
    _, local, _ = prepare(_data(str(tmp_path / "src")), 128, tmp_path / "cache")
    meta, remote, _ = prepare(_data(f"file://{tmp_path}/src/*.parquet"), 128, tmp_path / "cache")
    assert meta["files"] == 2 and sum(meta["rows"].values()) == len(frame)
    for name in ("train", "val", "test"):
        assert (_split(local, name)["key"] == _split(remote, name)["key"]).all()


def test_standardize_is_fitted_on_the_train_split_only(ray_cluster, tmp_path):
    from dataprep.cache import prepare

    _write(_cancer(), tmp_path / "cancer.parquet", "parquet")
    meta, entry, _ = prepare(_data(str(tmp_path / "cancer.parquet"), transforms=["standardize"]), 128, tmp_path / "cache")
    shift, scale = np.array(meta["normalize"]["shift"]), np.array(meta["normalize"]["scale"])
    raw = _split(entry, "train")
    # The cache keeps the features as read; the fitted statistics apply as batches reach the model.
    inputs = {tuple(row) for row in _cancer().drop(columns="diagnosis").to_numpy(np.float32)}
    assert all(tuple(row) in inputs for row in np.stack(raw["features"]))
    train = (np.stack(raw["features"]) - shift) / scale
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-3)
    val = (np.stack(_split(entry, "val")["features"]) - shift) / scale
    assert np.abs(val.mean(0)).max() > 1e-3  # fitted on train, applied to val: not re-centred on val
    assert meta["normalize"]["train_rows"] == meta["rows"]["train"]


def test_adding_a_file_keeps_every_old_row_in_its_split(ray_cluster, tmp_path):
    from dataprep.cache import prepare

    frame = _cancer()
    _write(frame.iloc[:400], tmp_path / "src" / "a.csv", "csv")
    _, before, _ = prepare(_data(str(tmp_path / "src")), 128, tmp_path / "cache")
    _write(frame.iloc[400:], tmp_path / "src" / "b.csv", "csv")
    _, after, reused = prepare(_data(str(tmp_path / "src")), 128, tmp_path / "cache")
    assert not reused and after != before
    for name in ("train", "val", "test"):
        old, new = set(_split(before, name)["key"]), set(_split(after, name)["key"])
        assert old <= new and len(new) > len(old)


def test_image_folders_label_by_subfolder_and_resize(ray_cluster, tmp_path):
    from PIL import Image
    import sklearn.datasets

    from dataprep.cache import prepare
    from runconfig.schema import DataConfig

    digits = sklearn.datasets.load_digits()
    for i in range(120):
        label = int(digits.target[i]) % 3
        pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        folder = tmp_path / "images" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    data = DataConfig.model_validate({"source": str(tmp_path / "images"), "format": "images",
                                      "transforms": [{"type": "resize", "size": [12, 10]}, {"type": "standardize", "per": "channel"},
                                                     {"type": "random_crop", "size": [8, 8], "padding": 1}, "flip"]}).model_dump(mode="json")
    meta, entry, _ = prepare(data, 128, tmp_path / "cache")
    assert meta["classes"] == ["class_0", "class_1", "class_2"] and meta["stored_shape"] == [1, 12, 10]
    assert meta["input_shape"] == [1, 8, 8] and [t["type"] for t in meta["augment"]] == ["random_crop", "flip"]
    assert sum(meta["rows"].values()) == 120
    train = np.stack(_split(entry, "train")["features"])
    assert train.shape[1:] == (1, 12, 10) and train.dtype == np.uint8  # cached as pixels
    shift, scale = np.array(meta["normalize"]["shift"]), np.array(meta["normalize"]["scale"])
    np.testing.assert_allclose(((train / 255 - shift) / scale).mean(), 0, atol=1e-4)
    # Rows are stored in the order of their keys (hashes of the images' paths), so no stretch of the
    # split as it is streamed is one class, however the folders are laid out.
    streamed = stream_split(entry, "train").to_pandas()
    assert list(streamed["key"]) == sorted(streamed["key"])
    assert all(len(set(streamed["label"][i:i + 10])) > 1 for i in range(0, len(streamed) - 10, 10))
    # Changing only an augmentation reuses the cached images.
    data["transforms"][-1] = {"type": "rotate", "degrees": 10}
    again, entry_again, reused = prepare(data, 128, tmp_path / "cache")
    assert reused and entry_again == entry and [t["type"] for t in again["augment"]] == ["random_crop", "rotate"]


def test_cache_is_reused_for_the_same_inputs_and_rebuilt_when_they_change(ray_cluster, tmp_path, capsys):
    import os

    source = tmp_path / "cancer.csv"
    _write(_cancer(), source, "csv")

    def run(name: str, *more: str) -> dict:
        assert _preprocess(tmp_path, name, source, *more) == 0
        return _preprocess_stage(tmp_path, name)["cache"]

    first = run("one")
    second = run("two")
    assert not first["reused"] and second["reused"] and second["key"] == first["key"]
    assert f"reused cached {first['key']}" in " ".join(capsys.readouterr().out.split())
    assert not run("three", "--set", "data.transforms=[minmax]")["reused"]  # another transform
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the input changed (a newer mtime)
    changed = run("four")
    assert not changed["reused"] and changed["key"] != first["key"]
    assert run("five")["reused"]
    entries = {p.name for p in (tmp_path / "cache").iterdir()}
    assert len(entries) == 3 and {first["key"], changed["key"]} <= entries  # whole entries only, no leftovers


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and row), exit 2, no cache entry written.


def _bad_run(tmp_path, capsys, source, *more: str) -> str:
    code = _preprocess(tmp_path, "run", source, *more)
    err = capsys.readouterr().err
    assert code == 2, err
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())  # nothing half-written
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_path_is_named(ray_cluster, tmp_path, capsys):
    line = _bad_run(tmp_path, capsys, tmp_path / "nowhere.csv")
    assert "data.source" in line and "nowhere.csv" in line


def test_empty_dataset_is_refused(ray_cluster, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("f0,f1,diagnosis\n")
    line = _bad_run(tmp_path, capsys, tmp_path / "empty.csv")
    assert "empty.csv" in line and "no rows" in line


def test_corrupt_parquet_is_named(ray_cluster, tmp_path, capsys):
    frame = _cancer()
    _write(frame, tmp_path / "src" / "good.parquet", "parquet")
    (tmp_path / "src" / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
    line = _bad_run(tmp_path, capsys, tmp_path / "src")
    assert "broken.parquet" in line and "not a readable Parquet file" in line


def test_unreadable_image_is_named(ray_cluster, tmp_path, capsys):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(tmp_path / "img" / label / f"{i}.png")
    (tmp_path / "img" / "b" / "9.png").write_bytes(b"\x89PNG truncated")
    line = _bad_run(tmp_path, capsys, tmp_path / "img", "--set", "data.format=images", "--set", "model.type=cnn")
    assert "9.png" in line and "not a readable image" in line


def test_missing_label_column_is_named(ray_cluster, tmp_path, capsys):
    _write(_cancer().drop(columns=["diagnosis"]), tmp_path / "cancer.parquet", "parquet")
    line = _bad_run(tmp_path, capsys, tmp_path / "cancer.parquet")
    assert "data.label_column" in line and "'diagnosis'" in line and "cancer.parquet" in line


def test_files_whose_schemas_disagree_are_named(ray_cluster, tmp_path, capsys):
    frame = _cancer()
    _write(frame.iloc[:300], tmp_path / "src" / "a.parquet", "parquet")
    _write(frame.iloc[300:].rename(columns={"f3": "f3_renamed"}), tmp_path / "src" / "b.parquet", "parquet")
    line = _bad_run(tmp_path, capsys, tmp_path / "src")
    assert "b.parquet" in line and "f3" in line and "differ" in line


def test_non_numeric_feature_names_file_and_row(ray_cluster, tmp_path, capsys):
    frame = _cancer().astype({"f2": object})
    frame.loc[41, "f2"] = "n/a"
    _write(frame, tmp_path / "cancer.csv", "csv")
    line = _bad_run(tmp_path, capsys, tmp_path / "cancer.csv")
    assert "cancer.csv, row 42" in line and "'f2'" in line and "'n/a'" in line and "on_bad_rows" in line


def test_on_bad_rows_skip_drops_and_counts_them_per_file(ray_cluster, tmp_path):
    frame = _cancer().astype({"f1": object})
    frame.loc[[3, 7], "f1"] = "oops"
    _write(frame.iloc[:300], tmp_path / "src" / "a.csv", "csv")
    with open(tmp_path / "src" / "b.jsonl", "w") as out:
        for i, row in enumerate(frame.iloc[300:].to_dict(orient="records")):
            out.write("{not json\n" if i == 5 else json.dumps(row) + "\n")
    skip = ("--set", "data.on_bad_rows=skip")
    both = f"[{tmp_path / 'src' / 'a.csv'}, {tmp_path / 'src' / 'b.jsonl'}]"
    assert _preprocess(tmp_path, "run", both, "--set", "data.format=auto", *skip) == 2  # csv and jsonl: one format too many
    assert _preprocess(tmp_path, "run2", tmp_path / "src" / "a.csv", *skip) == 0
    stage = _preprocess_stage(tmp_path, "run2")
    bad = stage["bad_rows"]
    assert list(bad) == [str(tmp_path / "src" / "a.csv")] and bad[str(tmp_path / "src" / "a.csv")]["rows"] == 2
    assert "'oops'" in bad[str(tmp_path / "src" / "a.csv")]["example"]
    assert sum(stage["rows"].values()) == 298

    (tmp_path / "src" / "a.csv").unlink()
    assert _preprocess(tmp_path, "run3", tmp_path / "src", *skip) == 0
    stage = _preprocess_stage(tmp_path, "run3")
    assert stage["bad_rows"][str(tmp_path / "src" / "b.jsonl")]["rows"] == 1
    assert sum(stage["rows"].values()) == len(frame) - 300 - 1


def test_bpe_tokenizer_round_trips_and_packs_fewer_blocks_than_bytes(ray_cluster, tmp_path):
    import sysconfig

    from tokenizers import Tokenizer

    from dataprep.cache import prepare
    from runconfig.schema import DataConfig

    def text(transforms) -> dict:
        return DataConfig.model_validate({"source": "python-stdlib", "format": "text", "text_glob": "json/*.py",
                                          "transforms": transforms}).model_dump(mode="json")

    meta, entry, _ = prepare(text([{"type": "tokenize", "tokenizer": "bpe", "vocab_size": 400}, "pack"]), 64, tmp_path / "cache")
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 400 and meta["num_classes"] == 400
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 400
    block = stream_split(entry, "train").take(1)[0]["tokens"]
    assert block.shape == (65,) and block.max() < 400
    sources = "".join(p.read_text() for p in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")))
    assert tokenizer.decode(block.tolist()) in sources  # a block is a stretch of one file's real text
    by_bytes, _, _ = prepare(text(["tokenize", "pack"]), 64, tmp_path / "cache")
    assert sum(meta["rows"].values()) < 0.6 * sum(by_bytes["rows"].values())  # BPE packs the same text into fewer tokens


def _files(entry: Path) -> dict[str, bytes]:
    return {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("source", ["sklearn:digits", "table with a repeated key"])
def test_the_same_inputs_give_the_same_cache_byte_for_byte_however_the_work_was_spread(ray_cluster, tmp_path, source):
    """Two builds into two folders, with Ray Data cutting the work differently (batch size and
    concurrency are speed settings, not in the cache key): the same rows in the same order in the
    same files. A cache rebuilt on another machine is then the one a resume or a rerun expects."""
    from dataprep.cache import prepare

    if source == "sklearn:digits":
        extra = {"transforms": [{"type": "standardize", "per": "feature"}]}
    else:
        frame = _cancer()
        frame["id"] = np.arange(len(frame)) // 3  # every key three times, over rows that differ
        _write(frame, tmp_path / "rows.csv", "csv")
        source, extra = str(tmp_path / "rows.csv"), {"key_column": "id", "transforms": ["minmax"]}
    built = []
    for name, speed in (("a", {"batch_size": 64, "concurrency": 1}), ("b", {"batch_size": 512, "concurrency": 2})):
        data = _data(source, **extra, **speed) | ({"label_column": "label"} if source == "sklearn:digits" else {})
        meta, entry, reused = prepare(data, 128, tmp_path / name)
        assert not reused
        built.append((meta["cache_key"], _files(entry)))
    (key_a, files_a), (key_b, files_b) = built
    assert key_a == key_b and list(files_a) == list(files_b)
    assert len([f for f in files_a if f.startswith("train/")]) > 1  # several files, cut at the same rows
    assert files_a == files_b
