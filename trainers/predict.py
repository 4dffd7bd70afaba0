"""Inference on raw input with an exported model (`raylaunch predict`): rows of a table, image
files, or a text to continue, preprocessed as the model's training data was (its spec's
`preprocess`: feature columns, normalization, image shape, tokenizer).

    from trainers.modeldir import load_model
    from trainers.predict import classify, read_inputs
    model, spec = load_model("runs/quickstart/models/student")
    inputs, names = read_inputs(spec, "digits.csv")
    print(classify(model, inputs, spec["classes"]))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataprep import TOKENIZER_FILE, DataError
from trainers.batches import model_batch
from trainers.models.hf import generation_model

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_inputs(spec: dict, source: Path | str) -> tuple[torch.Tensor, list[str]]:
    """Model inputs from raw input, preprocessed as the training data was, and a name per row:
    rows of a CSV/Parquet/JSONL file (the feature columns), image files (a file or a folder), or a
    text file for a language model (its last `seq_len` tokens)."""
    source = Path(source)
    if not source.exists():
        raise DataError([f"{source}: no such file or folder"])
    prep = spec["preprocess"]
    if prep["task"] == "lm":
        return _text_input(spec, source), [source.name]
    if prep.get("text_column"):
        return _labelled_text(spec, source)
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        features, names = _images(source, prep["stored_shape"])
    elif source.suffix.lower() in TABLE_SUFFIXES:
        features, names = _table(source, TABLE_SUFFIXES[source.suffix.lower()], prep)
    else:
        raise DataError([f"{source}: not a CSV, Parquet, JSONL or image file, nor a folder of images"])
    batch = {"features": torch.from_numpy(features), "label": torch.zeros(len(features), dtype=torch.long)}
    return model_batch(batch, prep)[0], names


def _table(path: Path, fmt: str, prep: dict) -> tuple[np.ndarray, list[str]]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    columns = prep.get("feature_columns")
    if not columns:
        raise DataError([f"{path}: this model was trained on images; give an image file or a folder of images"])
    try:
        table = {"csv": pyarrow.csv.read_csv, "parquet": pyarrow.parquet.read_table, "jsonl": pyarrow.json.read_json}[fmt](path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError([f"{path}: not a readable {fmt} file ({str(exc).splitlines()[0]})"]) from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError([f"{path}: missing the feature column(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} the model was trained on"])
    try:
        values = np.stack([table[c].to_numpy(zero_copy_only=False).astype(np.float32) for c in columns], axis=1)
    except (ValueError, TypeError) as exc:
        raise DataError([f"{path}: a feature column is not numeric ({exc})"]) from None
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise DataError([f"{path}, row {row + 1}: a feature value is missing or not a number"])
    return values.reshape(len(values), *prep["stored_shape"]), [f"row {i + 1}" for i in range(len(values))]


def _labelled_text(spec: dict, source: Path) -> tuple[torch.Tensor, list[str]]:
    """A text classifier's input: the text column of a table's rows, tokenized as its training rows
    were (the tokenizer's start and end tokens, truncated or right-padded to seq_len)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    prep, column = spec["preprocess"], spec["preprocess"]["text_column"]
    fmt = TABLE_SUFFIXES.get(source.suffix.lower())
    if fmt is None or source.is_dir():
        raise DataError([f"{source}: a text classifier reads a CSV, Parquet or JSONL file with a {column!r} column"])
    try:
        table = {"csv": pyarrow.csv.read_csv, "parquet": pyarrow.parquet.read_table, "jsonl": pyarrow.json.read_json}[fmt](source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError([f"{source}: not a readable {fmt} file ({str(exc).splitlines()[0]})"]) from None
    if column not in table.column_names:
        raise DataError([f"{source}: no {column!r} column, which the model reads its text from"])
    texts = table[column].cast(pa.string()).to_pylist()
    empty = next((i for i, t in enumerate(texts) if t is None), None)
    if empty is not None:
        raise DataError([f"{source}, row {empty + 1}: no text in the column {column!r}"])
    tokenizer = _transformers_tokenizer(spec)
    pad = prep.get("special_tokens", {}).get("pad_token_id", tokenizer.pad_token_id)
    ids = [tokenizer(t, truncation=True, max_length=prep["seq_len"])["input_ids"] for t in texts]
    padded = [row + [pad] * (prep["seq_len"] - len(row)) for row in ids]
    return torch.tensor(padded, dtype=torch.long), [f"row {i + 1}" for i in range(len(texts))]


def _images(source: Path, shape: list[int]) -> tuple[np.ndarray, list[str]]:
    import pyarrow.fs as pafs

    from dataprep.sources import decode_images

    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not files:
        raise DataError([f"{source}: no image files in the folder"])

    def refuse(bad: list[tuple[str, int, str]]) -> None:
        if bad:
            raise DataError([f"{bad[0][0]}: {bad[0][2]}"])

    # Decoded as the preprocess stage decodes them, resized to the model's input as its resize does.
    channels, height, width = shape
    decoded = decode_images({"path": [str(p.resolve()) for p in files]}, pafs.LocalFileSystem(),
                            "L" if channels == 1 else "RGB", (height, width), refuse)
    return decoded["image"], [str(p.relative_to(source)) if source.is_dir() else p.name for p in files]


def _text_input(spec: dict, path: Path) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except IsADirectoryError:
        raise DataError([f"{path}: a language model reads one text file"]) from None
    ids = encode(spec, text)
    if not ids:
        raise DataError([f"{path}: the file is empty"])
    return torch.tensor(ids, dtype=torch.long)


def encode(spec: dict, text: str) -> list[int]:
    kind = spec["preprocess"]["tokenizer"]
    if kind == "bytes":
        return list(text.encode("utf-8"))
    if kind == "model":  # as the training text was: no start token added
        tokenizer = _transformers_tokenizer(spec)
        if "instructions" in spec["preprocess"]:  # fine-tuned on chats: the text is the user's turn
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return _bpe(spec).encode(text).ids


def decode(spec: dict, ids: list[int]) -> str:
    kind = spec["preprocess"]["tokenizer"]
    if kind == "bytes":
        return bytes(ids).decode("utf-8", errors="replace")
    if kind == "model":
        return _transformers_tokenizer(spec).decode(ids, skip_special_tokens=True)
    return _bpe(spec).decode(ids)


def _bpe(spec: dict):
    from tokenizers import Tokenizer

    path = Path(spec["directory"]) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError([f"{spec['directory']}: the model's BPE tokenizer ({TOKENIZER_FILE}) is missing; copy it from the run's data cache"])
    return Tokenizer.from_file(str(path))


def _transformers_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec["directory"])
    except (OSError, ValueError):
        raise DataError([f"{spec['directory']}: the model's tokenizer files are missing; copy them from the run's "
                         f"data cache (its tokenizer/ folder)"]) from None


@torch.inference_mode()
def classify(model: nn.Module, inputs: torch.Tensor, classes: list, top_k: int = 1, batch_size: int = 256) -> list[list[tuple]]:
    """The `top_k` (class, probability) pairs of each row."""
    results = []
    for start in range(0, len(inputs), batch_size):
        probs = torch.softmax(model(inputs[start:start + batch_size]).float(), dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        results += [[(classes[i] if classes else i, round(v, 4)) for v, i in zip(vs.tolist(), ix.tolist())]
                    for vs, ix in zip(values, indices)]
    return results


@torch.inference_mode()
def generate(model: nn.Module, spec: dict, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[int]:
    """A continuation of `prompt`: greedy (`temperature` 0), or sampled at `temperature` from the
    smallest set of tokens whose probability reaches `top_p`. raylaunch's own models see a fixed
    window of their `seq_len` last tokens (an exported PT2E program has that length built in; a
    shorter prompt is left-padded with the newline token); a transformers model generates with
    transformers' own `generate`, from the prompt's last `seq_len` tokens, up to its end-of-text."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = spec["input_shape"][0]
    hf = generation_model(model)
    if hf is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        ids = hf.generate(input_ids=prompt[-seq_len:][None], attention_mask=torch.ones(1, min(len(prompt), seq_len),
                                                                                        dtype=torch.long),
                          max_new_tokens=new_tokens, **sampling)
        return ids[0, min(len(prompt), seq_len):].tolist()
    pad = encode(spec, "\n")[0]
    tokens = prompt.tolist()
    out = []
    for _ in range(new_tokens):
        window = ([pad] * seq_len + tokens)[-seq_len:]
        logits = model(torch.tensor([window]))[0, -1].float()
        token = int(logits.argmax()) if temperature <= 0 else sample(logits, temperature, top_p, generator)
        tokens.append(token)
        out.append(token)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token drawn from softmax(logits / temperature), kept to the top-p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # Keep each token whose preceding probability mass is below top_p (the first is always kept).
    keep = ordered.cumsum(-1) - ordered < top_p
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
