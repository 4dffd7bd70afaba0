"""Text in a table's column (`data.text_column` of Parquet, CSV or JSONL files), for a language
model or a sequence classifier.

A language model (`lm`) takes each row's text as a document: cut into pieces as text files are
(a long one), tokenized, each document ended by the end-of-text token and the rows of a read
block joined end to end before they are cut into blocks (`dataprep.text`): a block holds several
short documents, and only each read block's last tail is dropped.
A classifier (`classify`) takes each row on its own: its text tokenized (with the tokenizer's own
start and end tokens), truncated or right-padded to `seq_len`, and its label (`data.label_column`)
made a class index, in two passes as tables' labels are (the classes are values in the rows).
Rows are keyed by a key column, or by file and row number. A row without text (or, for a
classifier, without a label) is a bad row: named, or counted with `data.on_bad_rows: skip`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dataprep import DataError
from dataprep.preprocess import _label_order, _plain, row_keys, split_of
from dataprep.sources import FILE, ROW, Files, Problems, data_files, format_of, peek_columns, read_tables
from dataprep.text import PIECE_BLOCKS, HfTokenizer, _pack, cut, packed_meta, tokenization

TASKS = {"causal_lm": "lm", "sequence_classification": "classify"}


def model_task(model: dict) -> str:
    """What a model section asks of a table's text: a transformers model's `task`; raylaunch's own
    language model (gpt) reads text as a language model, label column or not."""
    return model["task"] if model["type"] == "hf" else "causal_lm"


def text_task(data: dict, model_task: str, files: Files | None = None) -> str:
    """`lm` or `classify`: text files are a language model's; a table's text column is a
    classifier's where `model.task` says so, or (`auto`) where its first file has the label column
    (`files`: the data's files where the caller has them listed; listed here only when needed)."""
    if data["format"] == "text" or data["text_column"] is None:
        return "lm"
    if model_task != "auto":
        return TASKS[model_task]
    files = files if files is not None else data_files(data)
    fmt = format_of(files) if data["format"] == "auto" else data["format"]
    return "classify" if data["label_column"] in peek_columns(files, fmt) else "lm"


def check_columns(data: dict, files: Files, task: str) -> None:
    """The text column (and a classifier's label column) in the first file."""
    fmt = format_of(files) if data["format"] == "auto" else data["format"]
    columns = peek_columns(files, fmt)
    needed = [("text_column", data["text_column"])] + ([("label_column", data["label_column"])] if task == "classify" else [])
    for field, name in needed:
        if name not in columns:
            raise DataError([f"data.{field}: {name!r} is not a column of {files.paths[0]} (columns: {', '.join(columns)})"])


def preprocess_text_table(data: dict, files: Files, task: str, seq_len: int, writer, out_dir: Path, problems: Problems,
                          hf: HfTokenizer | None) -> dict:
    fmt = format_of(files) if data["format"] == "auto" else data["format"]
    check_columns(data, files, task)
    keyed = {"column": data["text_column"], "label": data["label_column"] if task == "classify" else None,
             "key": data["key_column"], "relative": files.relative, "seed": data["seed"],
             "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"], "problems": problems}
    map_args = {"batch_format": "numpy", "batch_size": data["batch_size"], "concurrency": data["concurrency"]}
    rows = read_tables(files, fmt, problems, data["batch_size"]).map_batches(
        _text_rows, fn_kwargs=keyed | {"piece": PIECE_BLOCKS * (seq_len + 1) if task == "lm" else None},
        batch_format="pyarrow", batch_size=None)
    if task == "classify":
        rows = rows.materialize()  # read once: the classes, the tokenizer's training text and the encoding read it
    tokens = tokenization(data, hf, lambda: rows.filter(expr="split == 0"), out_dir)
    base = {"format": fmt, "files": len(files.paths), "text_column": data["text_column"]}
    if task == "lm":
        # Read, cut and packed in one task per read block (at most data.batch_size rows of one file):
        # which rows share a block then depends on the files alone, so the cache entry does too.
        packed = read_tables(files, fmt, problems, data["batch_size"]).map_batches(
            _rows_and_pack, fn_kwargs=keyed | {"piece": PIECE_BLOCKS * (seq_len + 1), "seq_len": seq_len,
                                               "tokenizer_json": tokens.json, "end_of_text": tokens.end_of_text},
            batch_format="pyarrow", batch_size=None)
        return base | packed_meta(writer(packed)[0], seq_len, tokens, data["seed"])

    if rows.count() == 0:
        raise DataError([f"data.source: no rows with text in {', '.join(files.paths[:3])}"])
    classes = sorted((str(v) for v in rows.unique("label")), key=_label_order)
    if len(classes) < 2:
        raise DataError([f"data.label_column: {data['label_column']!r} has one value ({classes[0]!r}); a classifier "
                         f"needs at least two classes"])
    pad = tokens.record().get("special_tokens", {}).get("pad_token_id", 0)
    encoded = rows.map_batches(_encode, fn_kwargs={"seq_len": seq_len, "tokenizer_json": tokens.json, "pad_id": pad,
                                                   "index": {c: i for i, c in enumerate(classes)}}, **map_args)
    counts, _ = writer(encoded)
    for name, count in counts.items():
        if count == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({sum(counts.values())} rows in all); use "
                             f"more data or a larger fraction"])
    return base | {"task": "classify", **tokens.record(), "label_column": data["label_column"],
                   "classes": [_plain(c) for c in classes], "num_classes": len(classes), "input_shape": [seq_len],
                   "stored_shape": [seq_len], "seq_len": seq_len, "rows": counts, "augment": [], "seed": data["seed"],
                   "normalize": {"method": "none", "per": "feature", "shift": [], "scale": [], "train_rows": counts["train"]}}


def _text_rows(batch: pa.Table, column: str, label: str | None, key: str | None, relative, seed: int,
               val_fraction: float, test_fraction: float, problems: Problems, piece: int | None) -> dict:
    """Each row's text (utf-8 bytes), key and split; a language model's rows cut into pieces of
    about `piece` bytes (`last` marks a document's last one), a classifier's with their label."""
    file = batch[FILE][0].as_py() if batch.num_rows else ""
    missing = [name for name in (column, label, key) if name is not None and name not in batch.column_names]
    if missing:
        raise DataError([f"{file}: no column {missing[0]!r} (the first file has it); make the files' schemas agree"])
    texts = batch[column].cast(pa.string()).to_pylist()
    labels = batch[label].cast(pa.string()).to_pylist() if label else [""] * len(texts)
    numbers = batch[ROW].to_numpy()
    bad = [(file, int(n), f"no text in the column {column!r}") for t, n in zip(texts, numbers) if t is None]
    bad += [(file, int(n), f"no value in the label column {label!r}") for t, y, n in zip(texts, labels, numbers)
            if t is not None and y is None]
    problems(bad)
    keep = [i for i, (t, y) in enumerate(zip(texts, labels)) if t is not None and y is not None]
    names = (batch[key].cast(pa.string()).to_pylist() if key else [f"{relative(file)}\0{n}" for n in numbers])
    out = {"text": [], "key": [], "label": [], "last": []}
    for i in keep:
        content = texts[i].encode("utf-8")
        pieces = cut(content, piece) if piece else [content]
        for index, part in enumerate(pieces):
            out["text"].append(part)
            out["key"].append(f"{names[i]}\0{index}")
            out["label"].append(labels[i])
            out["last"].append(index == len(pieces) - 1)
    keys = row_keys(out["key"]) if out["key"] else np.zeros(0, np.uint64)
    return {"text": np.array(out["text"], dtype=object), "key": keys.view(np.int64),
            "split": split_of(keys, seed, val_fraction, test_fraction), "label": np.array(out["label"], dtype=object),
            "last": np.array(out["last"], dtype=bool)}


def _rows_and_pack(batch: pa.Table, seq_len: int, tokenizer_json: str | None, end_of_text: int | None, **keyed) -> dict:
    return _pack(_text_rows(batch, **keyed), seq_len, tokenizer_json, end_of_text, join=True)


def _encode(batch: dict, seq_len: int, tokenizer_json: str | None, pad_id: int, index: dict) -> dict:
    """A classifier's rows: token ids truncated or right-padded to `seq_len`, labels as class indices."""
    texts = [bytes(t).decode("utf-8", "replace") for t in batch["text"]]
    if tokenizer_json is None:  # byte tokens
        ids = np.full((len(texts), seq_len), pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            values = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[:seq_len]
            ids[row, : len(values)] = values
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)  # once per task
        tokenizer.enable_truncation(max_length=seq_len)
        tokenizer.enable_padding(length=seq_len, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "")
        encoded = tokenizer.encode_batch(texts)  # with the tokenizer's own start and end tokens ([CLS] ... [SEP])
        ids = np.array([e.ids for e in encoded], dtype=np.int32).reshape(len(texts), seq_len)
    return {"features": ids, "label": np.array([index[str(v)] for v in batch["label"]], dtype=np.int64),
            "key": batch["key"], "split": batch["split"]}
