"""Text for the language model: files read by Ray Data, cut into pieces, tokenized, packed.

Each file is cut into pieces of about `PIECE_BLOCKS` blocks' worth of bytes (32 x (seq_len + 1)),
at line ends; a piece is the unit of the
split (a keyed hash of the file's path relative to the source and the piece's index in it, so
adding files leaves every old piece where it was) and of packing (its tokens are cut into blocks
of `seq_len + 1`, the tail shorter than a block dropped; a block never spans two pieces).

Tokenizers: `bytes` (every byte a token, vocabulary 256) or `bpe`, a byte-level BPE from
Hugging Face `tokenizers` trained on the train split's pieces only and saved beside the data
(`tokenizer.json`). A transformers model (`model.type: hf`) brings its own tokenizer
(`HfTokenizer`): its fast tokenizer runs in the Ray Data tasks, each file's last piece ends with
its end-of-text token, and it is saved beside the data as a transformers tokenizer folder
(`tokenizer/`), as is a BPE trained for such a model. Output rows: `tokens` (int32, seq_len + 1:
the model reads the first seq_len, the labels are the last seq_len) and `key`, in `train/`,
`val/`, `test/`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from dataprep import TOKENIZER_DIR, TOKENIZER_FILE, DataError, find_transform
from dataprep.preprocess import row_keys, split_of
from dataprep.sources import Files

BYTE_VOCAB = 256
# Pieces of 32 blocks: fine enough to split a small corpus, coarse enough that dropping each
# piece's tail (half a block on average) wastes ~1.5% of byte tokens (~5% of BPE tokens).
PIECE_BLOCKS = 32


END_OF_TEXT = "<|endoftext|>"  # the special token a BPE trained for a transformers model separates documents with


def tokenizer_of(data: dict) -> dict:
    return find_transform(data["transforms"], "tokenize") or {"type": "tokenize", "tokenizer": "bytes", "vocab_size": BYTE_VOCAB}


@dataclass(frozen=True)
class HfTokenizer:
    """The text of a transformers model: tokenized with the tokenizer at `source` (a folder or a
    hub id), or with None, a BPE trained on the train split (data.transforms) saved as one."""

    source: str | None
    trust_remote_code: bool = False
    loaded: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def for_model(cls, model: dict) -> HfTokenizer | None:
        """The tokenizer of a `model` config section's text: `model.tokenizer`, else the model
        folder's own; a model built from hf_config without either trains the data's BPE. None for
        raylaunch's own models (data.transforms decides)."""
        if model["type"] != "hf":
            return None
        return cls(model.get("tokenizer") or model.get("name_or_path"), model.get("trust_remote_code", False))

    def load(self):
        """The transformers tokenizer at `source`, loaded once (a DataError where it cannot be)."""
        if self.loaded is None:
            object.__setattr__(self, "loaded", load_tokenizer(self.source, self.trust_remote_code))
        return self.loaded

    def fingerprint(self) -> str:
        """What the cache key keeps of it: a hash of the tokenizer it loads (its vocabulary, merges,
        special tokens), or that a BPE is trained for a transformers model."""
        if self.source is None:
            return f"bpe with {END_OF_TEXT}"
        tokenizer = self.load()
        content = tokenizer.backend_tokenizer.to_str() + repr(sorted(special_token_ids(tokenizer).items()))
        return hashlib.sha256(content.encode()).hexdigest()[:16]


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError([f"{source}: no tokenizer could be loaded ({str(exc).splitlines()[0][:200]}); give a folder "
                         f"with tokenizer files (tokenizer.json) in model.name_or_path or model.tokenizer"]) from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError([f"{source}: the tokenizer has no fast (tokenizer.json) form, which the Ray Data tasks run; "
                         f"save it with a fast tokenizer (tokenizer.save_pretrained after AutoTokenizer.from_pretrained)"])
    if end_of_text_id(tokenizer) is None:
        raise DataError([f"{source}: the tokenizer has no end-of-text token (eos_token or sep_token) to put between "
                         f"documents; set tokenizer.eos_token and save it again"])
    return tokenizer


def end_of_text_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids a transformers model's config and generation config take from its tokenizer."""
    ids = {"eos_token_id": end_of_text_id(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_text_id(tokenizer)}
    return {name: int(value) for name, value in ids.items() if value is not None}


def bpe_as_transformers(tokenizer_json: str):
    """A BPE trained here (with END_OF_TEXT) as a transformers tokenizer, its one special token
    standing for the start and end of a text and for padding, as GPT-2's does."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token=END_OF_TEXT,
                                   eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


@dataclass(frozen=True)
class Tokenization:
    """How a text source is tokenized: the tokenizer's serialized form that the Ray Data tasks load
    (None: byte tokens), its kind, its end-of-text id (between documents), its vocabulary and the
    transformers tokenizer itself (saved beside the data), where there is one."""

    json: str | None
    kind: str
    end_of_text: int | None
    vocab_size: int
    transformers: Any = None

    def record(self) -> dict:
        """What the data's meta.json keeps of it."""
        record = {"tokenizer": self.kind, "vocab_size": self.vocab_size}
        if self.transformers is not None:
            record["special_tokens"] = special_token_ids(self.transformers)
        return record


def tokenization(data: dict, hf: HfTokenizer | None, train_split, out_dir: Path) -> Tokenization:
    """The tokenizer of a text source: a transformers model's own (`hf`), or data.transforms'
    bytes or BPE; a BPE is trained on `train_split()` (a dataset of the train split's `text`) and
    saved in `out_dir` (as a transformers tokenizer, with an end-of-text token, for `hf`)."""
    spec = tokenizer_of(data)
    if hf is not None and hf.source is not None:
        tokenizer = hf.load()
        tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
        return Tokenization(tokenizer.backend_tokenizer.to_str(), "model", end_of_text_id(tokenizer), len(tokenizer),
                            tokenizer)
    if spec["tokenizer"] != "bpe":
        return Tokenization(None, "bytes", None, BYTE_VOCAB)
    tokenizer_json = train_bpe(train_split(), spec["vocab_size"], [END_OF_TEXT] if hf is not None else [])
    if hf is None:
        (out_dir / TOKENIZER_FILE).write_text(tokenizer_json)
        return Tokenization(tokenizer_json, "bpe", None, spec["vocab_size"])
    tokenizer = bpe_as_transformers(tokenizer_json)
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
    return Tokenization(tokenizer_json, "bpe", end_of_text_id(tokenizer), len(tokenizer), tokenizer)


def preprocess_text(data: dict, files: Files, seq_len: int, writer, out_dir: Path, hf: HfTokenizer | None = None) -> dict:
    keyed = {"relative": files.relative, "size": PIECE_BLOCKS * (seq_len + 1), "seed": data["seed"],
             "val_fraction": data["val_fraction"], "test_fraction": data["test_fraction"]}
    # Paths, not contents, go through the object store: each task reads its files itself, and
    # reading, cutting, tokenizing and packing fuse into one task per batch of files.
    paths = ray.data.from_items([{"path": p} for p in files.paths], override_num_blocks=min(len(files.paths), 64))
    read_args = {"batch_size": 16, "concurrency": data["concurrency"], "batch_format": "numpy"}
    tokens = tokenization(data, hf, lambda: paths.map_batches(_read_pieces, fn_kwargs={"filesystem": files.filesystem, **keyed},
                                                              **read_args).filter(expr="split == 0"), out_dir)
    packed = paths.map_batches(_read_and_pack, fn_kwargs={"filesystem": files.filesystem, "seq_len": seq_len,
                                                          "tokenizer_json": tokens.json, "end_of_text": tokens.end_of_text,
                                                          **keyed}, **read_args)
    sizes = [i.size for i in files.filesystem.get_file_info(files.paths)]
    return {"format": "text", "files": len(files.paths), **packed_meta(writer(packed)[0], seq_len, tokens, data["seed"]),
            "bytes": int(sum(sizes))}


def packed_meta(rows: dict[str, int], seq_len: int, tokens: Tokenization, seed: int) -> dict:
    """The meta.json of text packed into blocks (refusing an empty split)."""
    for name, count in rows.items():
        if count == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({sum(rows.values())} blocks of {seq_len + 1} "
                             f"tokens in all); use more text, a shorter model.seq_len or a larger fraction"])
    return {"task": "lm", **tokens.record(), "num_classes": tokens.vocab_size, "classes": None, "input_shape": [seq_len],
            "stored_shape": [seq_len + 1], "seq_len": seq_len, "rows": rows, "tokens": {k: v * seq_len for k, v in rows.items()},
            "augment": [], "seed": seed}


def _read(paths, filesystem) -> list[bytes]:
    out = []
    for path in paths:
        with filesystem.open_input_stream(str(path)) as f:
            out.append(f.readall())
    return out


def _read_pieces(batch: dict, filesystem, **keyed) -> dict:
    return _pieces({"bytes": _read(batch["path"], filesystem), "path": batch["path"]}, **keyed)


def _read_and_pack(batch: dict, filesystem, seq_len: int, tokenizer_json: str | None, end_of_text: int | None,
                   **keyed) -> dict:
    return _pack(_read_pieces(batch, filesystem, **keyed), seq_len, tokenizer_json, end_of_text)


def _pieces(batch: dict, relative, size: int, seed: int, val_fraction: float, test_fraction: float) -> dict:
    texts, names, sizes, last = [], [], [], []
    for content, path in zip(batch["bytes"], batch["path"]):
        name = relative(str(path))
        pieces = cut(content, size)
        for index, piece in enumerate(pieces):
            texts.append(piece)
            names.append(f"{name}\0{index}")
            sizes.append(len(piece))
            last.append(index == len(pieces) - 1)
    keys = row_keys(names) if names else np.zeros(0, np.uint64)
    return {"text": np.array(texts, dtype=object), "key": keys.view(np.int64),
            "split": split_of(keys, seed, val_fraction, test_fraction), "bytes": np.array(sizes, dtype=np.int64),
            "last": np.array(last, dtype=bool)}


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


def train_bpe(train_pieces: ray.data.Dataset, vocab_size: int, special_tokens: list[str] = ()) -> str:
    """A byte-level BPE trained on the train split's text (streamed to the trainer in batches);
    `special_tokens` take the first ids and count in `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    texts = (bytes(t).decode("utf-8", "replace") for batch in train_pieces.iter_batches(batch_size=256, batch_format="numpy")
             for t in batch["text"])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def _pack(batch: dict, seq_len: int, tokenizer_json: str | None, end_of_text: int | None = None,
          join: bool = False) -> dict:
    """Token blocks of `seq_len + 1` from a batch's pieces: each piece cut on its own, or (`join`:
    short documents, a table's rows) the pieces of each split joined end to end first, so that a
    block holds several documents and only the batch's last tail is dropped."""
    if tokenizer_json is None:
        streams = [np.frombuffer(bytes(t), dtype=np.uint8).astype(np.int32) for t in batch["text"]]
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)  # once per task (a batch of files)
        # No special tokens per piece (a transformers tokenizer's template would add a start
        # token to each); a document's end is marked below.
        encoded = tokenizer.encode_batch([bytes(t).decode("utf-8", "replace") for t in batch["text"]],
                                         add_special_tokens=False)
        streams = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
    if end_of_text is not None:  # a file's last piece ends with the end-of-text token
        streams = [np.append(s, np.int32(end_of_text)) if last else s for s, last in zip(streams, batch["last"])]
    keys_in, splits_in = batch["key"], batch["split"]
    if join and len(streams):
        # One stream per split, keyed by its first piece's key (its blocks' keys follow on from it).
        groups = [np.flatnonzero(splits_in == split) for split in np.unique(splits_in)]
        streams = [np.concatenate([streams[i] for i in group]) for group in groups]
        keys_in = np.array([keys_in[group[0]] for group in groups], dtype=np.int64)
        splits_in = np.array([splits_in[group[0]] for group in groups], dtype=np.int8)
    blocks, keys, splits = [], [], []
    for stream, key, split in zip(streams, keys_in, splits_in):
        count = len(stream) // (seq_len + 1)
        if count:
            blocks.append(stream[: count * (seq_len + 1)].reshape(count, seq_len + 1))
            # block i of a piece: the piece's key advanced by i (a distinct, stable key per block)
            keys.append(key + np.arange(count, dtype=np.int64))
            splits.append(np.full(count, split, dtype=np.int8))
    if not blocks:
        return {"tokens": np.zeros((0, seq_len + 1), np.int32), "key": np.zeros(0, np.int64), "split": np.zeros(0, np.int8)}
    return {"tokens": np.concatenate(blocks), "key": np.concatenate(keys), "split": np.concatenate(splits)}
