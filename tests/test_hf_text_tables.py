"""Text in a table's column (`data.text_column`): a transformers sequence classifier trained on
labelled rows and exported as a folder `AutoModelForSequenceClassification` loads; a language
model reading the rows as documents; bad rows and misnamed columns said in one line. The text is
real: chunks of this Python's own json, http and email packages, labelled by package."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import raylaunch
from hf_models import save_classifier, save_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def code_chunks(limit: int = 1500) -> pd.DataFrame:
    """Six-line chunks of the json, http and email packages' sources, labelled by package, shuffled."""
    rows = []
    for package in ("json", "http", "email"):
        for path in sorted((STDLIB / package).glob("*.py")):
            lines = path.read_text().splitlines()
            rows += [{"text": text, "package": package} for i in range(0, len(lines), 6)
                     if len(text := "\n".join(lines[i:i + 6]).strip()) > 40]
    return pd.DataFrame(rows).sample(frac=1, random_state=0).head(limit).reset_index(drop=True)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "code.jsonl"
    code_chunks().to_json(path, orient="records", lines=True)
    return path


def _config(tmp_path: Path, source: Path, model: dict, data: dict | None = None, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": str(source), "text_column": "text", "label_column": "package", "val_fraction": 0.15,
                 "test_fraction": 0.15, "cache_dir": str(tmp_path / "cache")} | (data or {}),
        "model": {"type": "hf", "seq_len": 64} | model,
        "train": {"workers": 2, "epochs": 10, "micro_batch_size": 16, "lr": 3e-3} | train,
        "output": {"dir": str(tmp_path / "run")}}))
    return path


@pytest.mark.ray
def test_a_bert_classifier_learns_which_package_a_chunk_of_code_comes_from(labelled, ray_address, tmp_path):
    """A BERT folder (its tokenizer wrapping each text as [CLS] text [SEP]) fine-tuned on the labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = save_classifier(tmp_path / "bert", ["a", "b"])  # another head: raylaunch gives it the data's 3 classes
    config = _config(tmp_path, labelled, {"name_or_path": str(folder)})
    done = raylaunch("run", str(config), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    assert "1,500 rows, 3 classes -> train" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    majority = code_chunks()["package"].value_counts(normalize=True).max()  # email: 0.57
    assert summary["models"]["teacher"]["accuracy"] > majority + 0.1

    exported = tmp_path / "run" / "models" / "teacher"
    theirs = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert theirs.config.id2label == {0: "email", 1: "http", 2: "json"}
    cached = json.loads((Path(json.loads((tmp_path / "run" / "data.json").read_text())["path"]) / "meta.json").read_text())
    assert cached["tokenizer"] == "model" and cached["special_tokens"]["pad_token_id"] == tokenizer.pad_token_id
    rows = code_chunks().tail(8)
    rows[["text"]].to_csv(tmp_path / "rows.csv", index=False)
    predicted = raylaunch("predict", str(exported), str(tmp_path / "rows.csv"), "--output", str(tmp_path / "out.jsonl"))
    assert predicted.returncode == 0 and predicted.stderr == "", predicted.stdout + predicted.stderr
    ours = [json.loads(line)["class"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    inputs = tokenizer(rows["text"].tolist(), truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        assert ours == [theirs.config.id2label[i] for i in theirs(**inputs).logits.argmax(-1).tolist()]


@pytest.mark.ray
def test_a_language_model_reads_a_parquet_columns_rows_as_documents(ray_cluster, tmp_path):
    """Each row a document: tokenized with the model's tokenizer, ended by its end-of-text token."""
    from transformers import AutoTokenizer

    from dataprep.cache import prepare
    from dataprep.stream import stream_split
    from dataprep.text import HfTokenizer
    from runconfig.schema import DataConfig

    folder = save_model(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chunks = code_chunks(300)
    chunks[["text"]].to_parquet(tmp_path / "docs.parquet")
    data = DataConfig(source=str(tmp_path / "docs.parquet"), text_column="text", val_fraction=0.1,
                      test_fraction=0.1).model_dump(mode="json")
    meta, out, _ = prepare(data, 16, tmp_path / "cache", hf=HfTokenizer(str(folder)))
    assert (meta["task"], meta["tokenizer"], meta["text_column"]) == ("lm", "model", "text")
    blocks = [row for split in ("train", "val", "test") for row in stream_split(out, split).to_pandas()["tokens"]]
    tokens = sum(len(b) for b in blocks)
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in chunks["text"])
    assert 0.8 * expected < tokens <= expected  # each document's tail shorter than a block is dropped
    ends = sum(int((torch.as_tensor(b) == tokenizer.eos_token_id).sum()) for b in blocks)
    assert ends > 100  # most of the 300 documents' ends survive packing


def test_rows_without_text_are_named_or_skipped(ray_cluster, tmp_path):
    chunks = code_chunks(200)
    chunks.loc[7, "text"] = None
    chunks.to_json(tmp_path / "code.jsonl", orient="records", lines=True)
    folder = save_model(tmp_path / "llama")
    config = _config(tmp_path, tmp_path / "code.jsonl", {"name_or_path": str(folder)})
    import ray

    address = ray.get_runtime_context().gcs_address
    done = raylaunch("run", str(config), "--stages", "preprocess", address=address)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (f"{tmp_path / 'code.jsonl'}, row 8: no text in the column 'text'; fix the data, or "
                                   f"set data.on_bad_rows: skip to drop such rows")
    assert not (tmp_path / "run").exists()
    done = raylaunch("run", str(config), "--stages", "preprocess", "--set", "data.on_bad_rows=skip", address=address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["preprocess"]
    assert sum(summary["rows"].values()) == 199 and summary["bad_rows"][str(tmp_path / "code.jsonl")]["rows"] == 1


REFUSED = {
    "no-text-column": ({"text_column": "body"}, {}, "data.text_column: 'body' is not a column of CODE (columns: text, "
                       "package)"),
    "pack-a-classifier": ({"transforms": ["tokenize", "pack"]}, {},
                          "data.transforms: pack joins texts into blocks for a language model; a classifier reads each "
                          "row's text on its own (truncated or padded to model.seq_len): use [tokenize]"),
    "classify-without-text-column": ({"text_column": None, "format": "text", "source": "python-stdlib"},
                                     {"task": "sequence_classification"},
                                     "model.task: sequence_classification gives each text a label: set data.text_column "
                                     "(and data.label_column) to columns of a Parquet, CSV or JSONL table"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_text_table_the_model_cannot_read_is_one_line_before_ray_starts(case, labelled, tmp_path):
    data, model, line = REFUSED[case]
    folder = save_model(tmp_path / "llama")
    done = raylaunch("run", str(_config(tmp_path, labelled, {"name_or_path": str(folder)} | model, data)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == line.replace("CODE", str(labelled)), done.stderr
    assert not (tmp_path / "run").exists()


def test_the_built_in_gpt_reads_a_text_column_as_a_language_model_label_column_or_not(tmp_path):
    from dataprep.sources import data_files
    from dataprep.text_tables import model_task, text_task
    from launcher.checks import load_for_run
    from launcher.plan import model_size

    code_chunks(100).to_parquet(tmp_path / "code.parquet")  # text and package columns
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "code.parquet"), "text_column": "text",
                                               "label_column": "package"},
                                      "model": {"type": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 32},
                                      "output": {"dir": str(tmp_path / "run")}}))
    cfg, _ = load_for_run(config, [], None)
    data = cfg.data.model_dump(mode="json")
    assert text_task(data, model_task(cfg.model.model_dump(mode="json")), data_files(data)) == "lm"
    assert text_task(data, "auto", data_files(data)) == "classify"  # what an hf model would make of it
    params, _, _ = model_size(cfg)
    assert params == 256 * 16 + 32 * 16 + 12 * 16 * 16 + 13 * 16 + 2 * 16 + 16 * 256  # byte vocabulary in and out
