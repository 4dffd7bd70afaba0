"""Text for the language model: files read by Ray Data, cut into pieces, tokenized, packed.

Each file is cut into pieces of about `PIECE_BLOCKS` blocks' worth of bytes (32 x (seq_len + 1)),
at line ends; a piece is the unit of the
split (a keyed hash of the file's path relative to the source and the piece's index in it, so
adding files leaves every old piece where it was) and of packing (its tokens are cut into blocks
of `seq_len + 1`, the tail shorter than a block dropped; a block never spans two pieces).

Tokenizers: `bytes` (every byte a token, vocabulary 256) or `bpe`, a byte-level BPE from
Hugging Face `tokenizers` trained on the train split's pieces only and saved beside the data
(`tokenizer.json`). Output rows: `tokens` (int32, seq_len + 1: the model reads the first
seq_len, the labels are the last seq_len) and `key`, in `train/`, `val/`, `test/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from dataprep import TOKENIZER_FILE, DataError, find_transform
from dataprep.preprocess import row_keys, split_of
from dataprep.sources import Files

BYTE_VOCAB = 256
# Pieces of 32 blocks: fine enough to split a small corpus, coarse enough that dropping each
# piece's tail (half a block on average) wastes ~1.5% of byte tokens (~5% of BPE tokens).
PIECE_BLOCKS = 32


def tokenizer_of(data: dict) -> dict:
    return find_transform(data["transforms"], "tokenize") or {"type": "tokenize", "tokenizer": "bytes", "vocab_size": BYTE_VOCAB}


def preprocess_text(data: dict, files: Files, seq_len: int, writer, out_dir: Path) -> dict:
    keyed = {"relative": files.relative, "size": PIECE_BLOCKS * (seq_len + 1), "seed": data["seed"],
             "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"]}
    # Paths, not contents, go through the object store: each task reads its files itself, and
    # reading, cutting, tokenizing and packing fuse into one task per batch of files.
    paths = ray.data.from_items([{"path": p} for p in files.paths], override_num_blocks=min(len(files.paths), 64))
    read_args = {"batch_size": 16, "concurrency": data["concurrency"], "batch_format": "numpy"}
    spec = tokenizer_of(data)
    tokenizer_json = None
    if spec["tokenizer"] == "bpe":
        pieces = paths.map_batches(_read_pieces, fn_kwargs={"filesystem": files.filesystem, **keyed}, **read_args)
        tokenizer_json = train_bpe(pieces.filter(expr="split == 0"), spec["vocab_size"])
        (out_dir / TOKENIZER_FILE).write_text(tokenizer_json)
    packed = paths.map_batches(_read_and_pack, fn_kwargs={"filesystem": files.filesystem, "seq_len": seq_len,
                                                          "tokenizer_json": tokenizer_json, **keyed}, **read_args)
    rows, _ = writer(packed)
    for name, count in rows.items():
        if count == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({sum(rows.values())} blocks of {seq_len + 1} "
                             f"tokens in all); use more text, a shorter model.seq_len or a larger fraction"])
    vocab = BYTE_VOCAB if tokenizer_json is None else spec["vocab_size"]
    sizes = [i.size for i in files.filesystem.get_file_info(files.paths)]
    return {"format": "text", "files": len(files.paths), "task": "lm", "tokenizer": spec["tokenizer"],
            "vocab_size": vocab, "num_classes": vocab, "classes": None, "input_shape": [seq_len], "stored_shape": [seq_len + 1],
            "seq_len": seq_len, "rows": rows, "tokens": {k: v * seq_len for k, v in rows.items()}, "augment": [],
            "seed": data["seed"], "bytes": int(sum(sizes))}


def _read(paths, filesystem) -> list[bytes]:
    out = []
    for path in paths:
        with filesystem.open_input_stream(str(path)) as f:
            out.append(f.readall())
    return out


def _read_pieces(batch: dict, filesystem, **keyed) -> dict:
    return _pieces({"bytes": _read(batch["path"], filesystem), "path": batch["path"]}, **keyed)


def _read_and_pack(batch: dict, filesystem, seq_len: int, tokenizer_json: str | None, **keyed) -> dict:
    return _pack(_read_pieces(batch, filesystem, **keyed), seq_len, tokenizer_json)


def _pieces(batch: dict, relative, size: int, seed: int, val_fraction: float, test_fraction: float) -> dict:
    texts, names, sizes = [], [], []
    for content, path in zip(batch["bytes"], batch["path"]):
        name = relative(str(path))
        for index, piece in enumerate(cut(content, size)):
            texts.append(piece)
            names.append(f"{name}\0{index}")
            sizes.append(len(piece))
    keys = row_keys(names) if names else np.zeros(0, np.uint64)
    return {"text": np.array(texts, dtype=object), "key": keys.view(np.int64),
            "split": split_of(keys, seed, val_fraction, test_fraction), "bytes": np.array(sizes, dtype=np.int64)}


def cut(content: bytes, size: int) -> list[bytes]:
    """Pieces of about `size` bytes, each ending at a line end where there is one."""
    pieces, start = [], 0
    while start < len(content):
        end = min(start + size, len(content))
        if end < len(content):
            newline = content.rfind(b"\n", start, end)
            end = newline + 1 if newline > start else end
        pieces.append(content[start:end])
        start = end
    return pieces


def train_bpe(train_pieces: ray.data.Dataset, vocab_size: int) -> str:
    """A byte-level BPE trained on the train split's text (streamed to the trainer in batches)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = (bytes(t).decode("utf-8", "replace") for batch in train_pieces.iter_batches(batch_size=256, batch_format="numpy")
             for t in batch["text"])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def _pack(batch: dict, seq_len: int, tokenizer_json: str | None) -> dict:
    if tokenizer_json is None:
        streams = [np.frombuffer(bytes(t), dtype=np.uint8).astype(np.int32) for t in batch["text"]]
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        encoded = tokenizer.encode_batch([bytes(t).decode("utf-8", "replace") for t in batch["text"]])
        streams = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
    blocks, keys, splits = [], [], []
    for stream, key, split in zip(streams, batch["key"], batch["split"]):
        count = len(stream) // (seq_len + 1)
        if count:
            blocks.append(stream[: count * (seq_len + 1)].reshape(count, seq_len + 1))
            # block i of a piece: the piece's key advanced by i (a distinct, stable key per block)
            keys.append(key + np.arange(count, dtype=np.int64))
            splits.append(np.full(count, split, dtype=np.int8))
    if not blocks:
        return {"tokens": np.zeros((0, seq_len + 1), np.int32), "key": np.zeros(0, np.int64), "split": np.zeros(0, np.int8)}
    return {"tokens": np.concatenate(blocks), "key": np.concatenate(keys), "split": np.concatenate(splits)}
