"""Exported models: `load_model` for any model directory a run writes, and inference on raw input.

A model directory holds `model.safetensors` and `model.json` (and a static_int8 model its program
compiled for a CPU, `model.pt2`: trainers.quantize). The spec says how to rebuild the
model (`format`: fp32, torchao or pt2e; the architecture; the quantization) and how raw input
becomes its input (`preprocess`: the feature columns, the normalization fitted on the train split,
the image shape, the tokenizer; a BPE tokenizer's `tokenizer.json` lies beside it).

    from trainers.export import load_model
    model, spec = load_model("runs/quickstart/models/student-static_int8", compiled=True)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataprep import TOKENIZER_FILE, DataError
from trainers.batches import model_batch
from trainers.checkpoint import SPEC, WEIGHTS, load_model_dir

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_spec(directory: Path | str) -> dict:
    """A model directory's `model.json`, with the directory it came from (`directory`)."""
    directory = Path(directory)
    for name in (SPEC, WEIGHTS):
        if not (directory / name).is_file():
            models = sorted(p.parent.name for p in (directory / "models").glob(f"*/{SPEC}"))
            hint = (f"it is a run directory: give one of its models ({', '.join(f'{directory}/models/{m}' for m in models)})"
                    if models else "give a folder under RUN_DIR/models/")
            raise DataError([f"{directory}: not a model directory (no {name}); {hint}"])
    try:
        return {**json.loads((directory / SPEC).read_text()), "directory": str(directory.resolve())}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError([f"{directory / SPEC}: not valid JSON ({exc}); export the model again"]) from None


def load_model(path: Path | str, compiled: bool = False) -> tuple[nn.Module, dict]:
    """Any exported model (fp32, torchao-quantized or PT2E static int8), ready for inference on
    CPU, with its spec. Nothing is unpickled: weights are safetensors, the spec JSON. `compiled`: a
    static_int8 model runs its compiled program (`model.pt2`, machine code: only from runs you trust)
    where it was compiled for this CPU and torch."""
    spec = read_spec(path)
    if spec.get("quantization"):
        from trainers.quantize import load_quantized_dir

        model, spec = load_quantized_dir(path, compiled_program=compiled)
    else:
        model, spec = load_model_dir(path)
    return model, {**spec, "directory": str(Path(path).resolve())}


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
    if spec["preprocess"]["tokenizer"] == "bytes":
        return list(text.encode("utf-8"))
    return _bpe(spec).encode(text).ids


def decode(spec: dict, ids: list[int]) -> str:
    if spec["preprocess"]["tokenizer"] == "bytes":
        return bytes(ids).decode("utf-8", errors="replace")
    return _bpe(spec).decode(ids)


def _bpe(spec: dict):
    from tokenizers import Tokenizer

    path = Path(spec["directory"]) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError([f"{spec['directory']}: the model's BPE tokenizer ({TOKENIZER_FILE}) is missing; copy it from the run's data cache"])
    return Tokenizer.from_file(str(path))


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
def generate(model: nn.Module, spec: dict, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt`. The model sees a fixed window of its `seq_len` last tokens
    (an exported PT2E program has that length built in); a shorter prompt is left-padded with the
    newline token."""
    seq_len = spec["input_shape"][0]
    pad = encode(spec, "\n")[0]
    tokens = prompt.tolist()
    out = []
    for _ in range(new_tokens):
        window = ([pad] * seq_len + tokens)[-seq_len:]
        logits = model(torch.tensor([window]))
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        out.append(token)
    return out
