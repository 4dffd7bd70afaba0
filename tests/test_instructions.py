"""Instruction and chat data (`data.instructions`): conversations rendered with the model's chat
template (or one made from the config's), tokenized in Ray Data tasks, the loss on the responses
only; packed several to a row without one example seeing another. Tiny models and tokenizers made
here (tests/hf_models.py); the data is this Python's own functions or rows the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import raylaunch
from hf_models import GPT2, LLAMA, save_model, train_tokenizer

PAIRS = {"prompt_column": "prompt", "response_column": "response", "system_column": None, "messages_column": None}
MESSAGES = {**PAIRS, "messages_column": "messages"}
CHATML = ("{%- for m in messages -%}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")
SEQ = 256


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from dataprep.instructions import with_chat_template

    return with_chat_template(train_tokenizer(tmp_path_factory.mktemp("tok")), {})


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama"), LLAMA | {"max_position_embeddings": SEQ})


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("gpt2"), GPT2 | {"n_positions": SEQ}, seed=1)


def _learned(tokenizer, ids: np.ndarray, labels: np.ndarray) -> str:
    return tokenizer.decode(labels[labels != -100].tolist())


def test_only_the_response_and_its_end_token_carry_a_loss(tokenizer):
    from dataprep.instructions import conversation, encode

    messages = conversation({"prompt": "Add two numbers.", "response": "return a + b"}, PAIRS)
    ids, labels = encode(tokenizer, messages, SEQ)
    assert tokenizer.decode(ids.tolist()) == "<s>### Instruction:\nAdd two numbers.\n\n### Response:\nreturn a + b</s>"
    assert _learned(tokenizer, ids, labels) == "return a + b</s>"
    learned = np.flatnonzero(labels != -100)
    assert (labels[learned] == ids[learned]).all() and learned[0] > 0 and learned[-1] == len(ids) - 1


def test_a_system_column_goes_before_the_prompt_as_context(tokenizer):
    from dataprep.instructions import conversation, encode

    messages = conversation({"s": "Be brief.", "prompt": "Hi", "response": "Hello"}, {**PAIRS, "system_column": "s"})
    ids, labels = encode(tokenizer, messages, SEQ)
    assert tokenizer.decode(ids.tolist()).startswith("<s>Be brief.\n\n### Instruction:\nHi")
    assert _learned(tokenizer, ids, labels) == "Hello</s>"


def test_every_assistant_turn_of_a_chat_is_learned_with_the_tokenizers_own_template(tokenizer):
    import copy

    from dataprep.instructions import conversation, encode, with_chat_template

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    chat = with_chat_template(chat, {})  # a template of its own is kept
    assert chat.chat_template == CHATML
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
             {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "three"}]
    ids, labels = encode(chat, conversation({"messages": json.dumps(turns)}, MESSAGES), SEQ)
    text = tokenizer.decode(ids.tolist())
    assert text == "<|system|>S</s><|user|>one</s><|assistant|>1</s><|user|>two</s><|assistant|>2</s>"  # the last user turn: nothing to learn
    pieces = [tokenizer.decode([int(t)]) if t != -100 else "." for t in labels]
    assert "".join(p for p in pieces if p != ".") == "1</s>2</s>"


def test_the_config_template_renders_the_data_and_is_saved_as_the_chat_template(tokenizer):
    from dataprep.instructions import conversation, encode, segments, with_chat_template

    template = {"user": "Q: {content}\n", "assistant": "A: {content}\n"}
    chat = with_chat_template(tokenizer, {"template": template})
    messages = conversation({"prompt": "2+2?", "response": "4"}, PAIRS)
    assert segments(chat, messages) == [("<s>Q: 2+2?\nA: ", False), ("4\n</s>", True)]
    # What the export's tokenizer renders for a prompt is what the model was trained to answer.
    assert chat.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == "<s>Q: 2+2?\nA: "
    assert _learned(tokenizer, *encode(chat, messages, SEQ)) == "4\n</s>"


BAD = {
    "missing response": ({"prompt": "p", "response": None}, PAIRS, "no value in the column 'response'"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, MESSAGES,
                     "turn 1 of 'messages' has the unknown role 'tool' (roles: system, user, assistant)"),
    "no assistant": ({"messages": [{"role": "user", "content": "x"}]}, MESSAGES, "no assistant turn in 'messages' to learn from"),
    "not turns": ({"messages": "[1, 2]"}, MESSAGES, "turn 1 of 'messages' is not {role, content} with text"),
    "no room": ({"prompt": "word " * 200, "response": "r"}, PAIRS, "leaving no room for the response within model.seq_len 64; "
                "raise model.seq_len or shorten the prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_row_that_cannot_be_an_example_says_why(case, tokenizer):
    from dataprep.instructions import BadExample, conversation, encode

    row, columns, reason = BAD[case]
    with pytest.raises(BadExample, match=None) as raised:
        encode(tokenizer, conversation(row, columns), 64)
    assert reason in str(raised.value)


def test_a_long_response_is_cut_at_the_sequence_keeping_its_start(tokenizer):
    from dataprep.instructions import conversation, encode

    ids, labels = encode(tokenizer, conversation({"prompt": "p", "response": "x = 1\n" * 100}, PAIRS), 32)
    assert len(ids) == len(labels) == 33 and (labels[-5:] != -100).all()


def _per_example_losses(model, rows: dict, examples_at: np.ndarray | None = None) -> list[float]:
    """Each example's summed loss, the examples found where `examples_at` (the rows' positions
    unless given) restart at 0."""
    from trainers.batches import model_batch, model_kwargs

    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    x, y = model_batch(batch, {})
    with torch.no_grad():
        losses = F.cross_entropy(model(x, **model_kwargs(batch)).flatten(0, 1), y.flatten(), reduction="none",
                                 ignore_index=-100).view(y.shape)
    out = []
    for row in range(len(x)):
        targets = y[row] != -100
        # the example a target belongs to: the one its input position lies in
        marks = examples_at if examples_at is not None else rows.get("positions")
        starts = np.flatnonzero(marks[row][:-1] == 0) if marks is not None else np.array([0])
        owner = np.searchsorted(starts, np.arange(len(targets)), side="right") - 1
        for example in range(len(starts)):
            mask = torch.from_numpy(owner == example) & targets
            if mask.any():
                out.append(float(losses[row][mask].sum()))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_examples_give_the_loss_each_gives_alone(name, request, tokenizer):
    """Packing on and off: the same loss per example to 1e-5; and packed without the restarting
    positions (every example seeing the ones before it) they would not."""
    from transformers import AutoModelForCausalLM

    from dataprep.instructions import conversation, encode, pack
    from trainers.models.hf import CausalLM, separates_packed

    folder = request.getfixturevalue(name)
    assert separates_packed({"type": "hf", "name_or_path": str(folder), "seq_len": SEQ})
    model = CausalLM(AutoModelForCausalLM.from_pretrained(folder)).eval()
    examples = [encode(tokenizer, conversation({"prompt": f"item {i} " * (i % 5 + 1), "response": "ok " * (i % 7 + 1)},
                                               PAIRS), SEQ) for i in range(12)]
    alone = pack(examples, SEQ, 2, packed=False)
    together = pack(examples, SEQ, 2, packed=True)
    assert len(together["tokens"]) < len(alone["tokens"]) == 12
    alone.pop("first"), together.pop("first")
    expected, got = _per_example_losses(model, alone), _per_example_losses(model, together)
    assert len(expected) == len(got) == 12
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    running = np.tile(np.arange(SEQ + 1, dtype=np.int32), (len(together["tokens"]), 1))
    seen = _per_example_losses(model, together | {"positions": running}, examples_at=together["positions"])
    assert len(seen) == 12 and not np.allclose(seen, expected, rtol=1e-5, atol=1e-5)


def test_a_model_of_its_own_code_gets_one_example_a_row():
    from trainers.models.hf import separates_packed

    assert not separates_packed({"type": "hf", "name_or_path": "unused", "trust_remote_code": True, "seq_len": SEQ})


def test_python_files_give_each_documented_functions_signature_and_body():
    from dataprep.python_functions import function_pairs

    source = ('import os\n\n\nclass C:\n    @property\n    def size(self):\n        """The size."""\n'
              '        n = 1\n        return n\n\n    def bare(self):\n        return 0\n\n\n'
              'def loud(x):\n    """A very long docstring that does not fit the prompt bytes given."""\n    return x\n')
    assert function_pairs(source, prompt_bytes=40) == {
        "prompt": ['def size(self):\n    """The size."""'], "response": ["    n = 1\n    return n"], "line": [6]}
    assert len(function_pairs(source)["prompt"]) == 2
    assert function_pairs("def broken(:\n") == {"prompt": [], "response": [], "line": []}


def _config(tmp_path: Path, model: Path, data: dict | None = None, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "python-stdlib", "text_glob": "logging/*.py", "instructions": {}, "val_fraction": 0.1,
                 "test_fraction": 0.1, "cache_dir": str(tmp_path / "cache")} | (data or {}),
        "model": {"type": "hf", "name_or_path": str(model), "seq_len": SEQ},
        "train": {"workers": 1, "epochs": 1, "micro_batch_size": 8, "lr": 3e-3} | train,
        "output": {"dir": str(tmp_path / "run")}}))
    return path


@pytest.mark.ray
def test_functions_of_the_standard_library_fine_tune_a_llama_packed_and_it_answers_a_prompt(llama, ray_address, tmp_path):
    """python-stdlib's documented functions as prompt -> body pairs, packed; the cached rows hold
    labels only on responses; the export renders a prompt with the chat template it was trained on."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from dataprep.stream import decode_tensors

    done = raylaunch("run", str(_config(tmp_path, llama, {"pack": True}, zero={"stage": 2})), address=ray_address)
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    assert "files of instructions -> rows of 256 tokens (examples packed, each attending to itself; loss on the responses)" \
        in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["preprocess"]["packed"] is True
    assert summary["models"]["teacher"]["perplexity"] > 1
    data_dir = Path(json.loads((tmp_path / "run" / "data.json").read_text())["path"])
    train = decode_tensors(pq.read_table(data_dir / "train"))
    labels, tokens, positions = (np.concatenate([chunk.to_numpy() for chunk in train[c].chunks])
                                 for c in ("labels", "tokens", "positions"))
    learned = labels != -100
    assert learned.any(axis=1).all() and (labels[learned] == tokens[learned]).all()
    assert ((positions == 0).sum(axis=1) > 1).any()  # some rows hold several examples
    exported = tmp_path / "run" / "models" / "teacher"
    rendered = AutoTokenizer.from_pretrained(exported).apply_chat_template(
        [{"role": "user", "content": "def f():"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>### Instruction:\ndef f():\n\n### Response:\n"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text('def close(self):\n    """Close the stream."""')
    answer = raylaunch("predict", str(exported), str(prompt), "--max-new-tokens", "8")
    assert answer.returncode == 0, answer.stdout + answer.stderr


@pytest.mark.ray
def test_a_bad_row_names_its_file_and_row_or_is_counted_when_skipped(llama, ray_address, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(60)]
    rows[7]["messages"][0]["role"] = "robot"
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"source": str(source), "instructions": {"messages_column": "messages"}, "text_glob": "**/*"}
    failed = raylaunch("run", str(_config(tmp_path, llama, data)), address=ray_address)
    assert failed.returncode == 2
    assert (f"{source}, row 8: turn 1 of 'messages' has the unknown role 'robot' (roles: system, user, assistant); fix the "
            f"data, or set data.on_bad_rows: skip to drop such rows") in failed.stdout + failed.stderr
    assert not list((tmp_path / "cache").glob(".*partial*"))
    done = raylaunch("run", str(_config(tmp_path, llama, data | {"on_bad_rows": "skip"})), "--stages", "preprocess",
                     address=ray_address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 bad rows skipped in 1 file(s)" in done.stdout


REFUSED = {
    "gpt": ({"model": {"type": "gpt"}}, "data.instructions: instruction data fine-tunes a transformers causal LM; set "
            "model.type: hf (got gpt)"),
    "column": ({"data": {"instructions": {"prompt_column": "question"}}}, "data.instructions.prompt_column: 'question' is "
               "not a column of"),
    "pack alone": ({"data": {"instructions": None, "pack": True, "format": "text"}}, "data.pack: packs instruction examples"),
    "python without instructions": ({"data": {"instructions": None, "format": "python"}}, "data.format: python reads "
                                    "functions as instruction pairs; set data.instructions: {}"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_config_instruction_data_cannot_run_is_one_line_before_ray_starts(case, llama, tmp_path):
    change, line = REFUSED[case]
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    path = _config(tmp_path, llama, {"source": str(source), "text_glob": "**/*"})
    config = yaml.safe_load(path.read_text())
    for section, values in change.items():
        config[section] |= values
        if section == "model" and values.get("type") != "hf":
            config["model"].pop("name_or_path")
    path.write_text(yaml.safe_dump(config))
    done = raylaunch("run", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert line in done.stdout + done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
