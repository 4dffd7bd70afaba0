"""The data description: what preprocessing found and did, kept as `meta.json` in the cache entry
beside the splits (dataprep.cache), and read by training, the model directory and the reports."""

from __future__ import annotations

from typing import Literal, Required, TypedDict


class Normalize(TypedDict):
    """What `trainers.batches.model_batch` applies after scaling pixels: (x - shift) / scale."""

    method: Literal["standardize", "minmax", "none"]
    per: Literal["feature", "channel"]
    shift: list
    scale: list
    train_rows: int


class DataMeta(TypedDict, total=False):
    """A preprocessed dataset (JSON: it is written to the cache and read back as it is)."""

    task: Required[Literal["classify", "lm"]]
    format: Required[str]
    """The source's format: csv, parquet, jsonl, images, sklearn, text."""
    files: Required[int]
    rows: Required[dict[str, int]]
    """Rows of each split: train, val, test (token blocks for a language model)."""
    input_shape: Required[list[int]]
    """One row as the model sees it (after a random crop; `[seq_len]` token ids)."""
    stored_shape: Required[list[int]]
    """One row as the cache holds it (`[seq_len + 1]` tokens: the inputs and the shifted labels)."""
    num_classes: Required[int]
    """Classes, or a language model's vocabulary size."""
    classes: Required[list | None]
    seed: Required[int]
    cache_key: Required[str]
    bad_rows: dict[str, dict]
    """Rows skipped (`data.on_bad_rows: skip`), by file: how many and the first reasons."""
    augment: list[dict]
    """This config's augmentations (`data.transforms` entries), drawn in the workers every epoch."""
    # classification
    feature_columns: list[str] | None
    label_column: str | None
    num_features: int
    normalize: Normalize
    # language model
    tokenizer: Literal["bytes", "bpe", "model"]
    """`model`: a transformers model's own tokenizer (saved in the entry's `tokenizer/`, as is a
    BPE trained for such a model)."""
    vocab_size: int
    special_tokens: dict[str, int]
    """A transformers tokenizer's eos/bos/pad ids (the exported model's config takes them)."""
    seq_len: int
    tokens: dict[str, int]
    bytes: int
