"""Text for the language model: files read by Ray Data, byte-level tokens, packed into blocks.

Each file becomes non-overlapping blocks of `seq_len + 1` byte tokens (a block never spans two
files; a file's tail shorter than a block is dropped). A block's split is a keyed hash of its file's
path (relative to the source folder) and its index in that file, so adding files leaves every old
block where it was. Output rows: `features` (tokens 0..seq_len-1) and `label` (tokens 1..seq_len),
both int64, in `train/`, `val/`, `test/` Parquet folders beside `meta.json`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import ray

from dataprep import DataError

VOCAB_SIZE = 256  # byte-level: every byte value is a token
STDLIB = "python-stdlib"
SPLITS = ("train", "val", "test")


def text_root(source: str) -> Path:
    """The folder a text source names: a path, or `python-stdlib` (this Python's own library
    sources: real text on every machine, no download)."""
    return Path(sysconfig.get_paths()["stdlib"]) if source == STDLIB else Path(source)


def text_files(source: str, pattern: str) -> tuple[Path, list[str]]:
    root = text_root(source)
    if root.is_file():
        return root.parent, [str(root)]
    files = sorted(p for p in glob.glob(str(root / pattern), recursive=True) if os.path.isfile(p))
    return root, files


def preprocess_text(data: dict, seq_len: int, out_dir: Path) -> dict:
    root, files = text_files(data["source"], data["text_glob"])
    if not files:
        raise DataError([f"data.text_glob: no files match {data['text_glob']!r} under {root}"])
    ds = ray.data.read_binary_files(files, include_paths=True)
    packed = ds.map_batches(_pack, fn_kwargs={"seq_len": seq_len, "root": str(root), "seed": data["seed"],
                                              "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"]},
                            batch_format="numpy", batch_size=8).materialize()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = {}
    for index, name in enumerate(SPLITS):
        split = packed.filter(expr=f"split == {index}").drop_columns(["split"]).materialize()
        rows[name] = split.count()
        if rows[name] == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({packed.count()} blocks of {seq_len + 1} "
                             f"tokens in all); use more text, a shorter model.seq_len or a larger fraction"])
        split.write_parquet(str(tmp / name))
    meta = {"source": data["source"], "root": str(root), "files": len(files), "task": "lm", "tokenizer": "bytes",
            "vocab_size": VOCAB_SIZE, "num_classes": VOCAB_SIZE, "classes": None, "input_shape": [seq_len],
            "seq_len": seq_len, "rows": rows, "tokens": {k: v * seq_len for k, v in rows.items()}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out_dir)
    return meta


def _pack(batch: dict, seq_len: int, root: str, seed: int, val_fraction: float, test_fraction: float) -> dict:
    key = seed.to_bytes(8, "little", signed=True)
    features, labels, splits = [], [], []
    for content, path in zip(batch["bytes"], batch["path"]):
        tokens = np.frombuffer(content, dtype=np.uint8).astype(np.int64)
        count = len(tokens) // (seq_len + 1)
        if count == 0:
            continue
        blocks = tokens[: count * (seq_len + 1)].reshape(count, seq_len + 1)
        name = os.path.relpath(path, root)
        for i in range(count):
            digest = hashlib.blake2b(f"{name}\0{i}".encode(), key=key, digest_size=8).digest()
            unit = int.from_bytes(digest, "little") / 2**64
            splits.append(2 if unit < test_fraction else 1 if unit < test_fraction + val_fraction else 0)
        features.append(blocks[:, :-1])
        labels.append(blocks[:, 1:])
    if not features:
        empty = np.zeros((0, seq_len), dtype=np.int64)
        return {"features": empty, "label": empty, "split": np.zeros(0, dtype=np.int8)}
    return {"features": np.concatenate(features), "label": np.concatenate(labels), "split": np.array(splits, dtype=np.int8)}
