"""Instruction and chat data (`data.instructions`) for fine-tuning a transformers causal LM.

Each row is a conversation: a prompt and a response column (with an optional system column), or
a column of `{role, content}` turns. It is rendered with the tokenizer's chat template (or one
made from `instructions.template`, saved with the tokenizer so that the export renders prompts
the same way), turn by turn: the text a conversation gains with each assistant turn, after the
generation prompt, is learned; everything before it is context. Each piece is tokenized on its
own, as a prompt is at inference. Rows are `tokens` and `labels` (`IGNORE` where there is no
loss) of seq_len + 1, truncated or right-padded; with `data.pack` several examples share a row and
`positions` restart at each one, which transformers' attention reads as separate sequences.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from dataprep import IGNORE, TOKENIZER_DIR, DataError
from dataprep.preprocess import row_keys, split_of
from dataprep.sources import FILE, ROW, Files, Problems, format_of, peek_columns, read_tables
from dataprep.text import HfTokenizer, tokenization

ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATE = {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n", "assistant": "### Response:\n{content}"}


class BadExample(ValueError):
    """A row that cannot be a training example; its message says why."""


def chat_template(template: dict[str, str] | None, bos_token: str | None = None) -> str:
    """A jinja chat template (as transformers' `apply_chat_template` renders) giving each turn the
    text `template` has for its role (DEFAULT_TEMPLATE's where it has none), an assistant turn
    ended by the end-of-text token; the generation prompt is the assistant's text before
    `{content}`; `bos_token` (a start token distinct from the end one) opens the text."""
    turns = {**DEFAULT_TEMPLATE, **(template or {})}

    def literal(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}" if text else ""  # jinja reads JSON's escapes in a string

    parts = ["{%- if bos_token -%}{{ bos_token }}{%- endif -%}" if bos_token else "",
             "{%- for message in messages -%}"]
    for index, role in enumerate(ROLES):
        before, after = turns[role].split("{content}")
        end = "{{ eos_token }}" if role == "assistant" else ""
        parts.append(("{%- if" if index == 0 else "{%- elif") + f" message['role'] == '{role}' -%}}"
                     + literal(before) + "{{ message['content'] }}" + literal(after) + end)
    parts.append("{%- endif -%}{%- endfor -%}")
    parts.append("{%- if add_generation_prompt -%}" + literal(turns["assistant"].split("{content}")[0]) + "{%- endif -%}")
    return "".join(parts)


def with_chat_template(tokenizer, instructions: dict):
    """The tokenizer with the chat template the data is rendered with: one made from
    `instructions["template"]` where it is given, else the tokenizer's own, else the default."""
    tokenizer = copy.deepcopy(tokenizer)
    if instructions.get("template") is not None or not tokenizer.chat_template:
        bos = tokenizer.bos_token if tokenizer.bos_token_id not in (None, tokenizer.eos_token_id) else None
        tokenizer.chat_template = chat_template(instructions.get("template"), bos)
    return tokenizer


def conversation(row: dict, instructions: dict) -> list[dict]:
    """A row's turns: its messages column, or system, prompt and response; BadExample where the
    row has none to learn from."""
    column = instructions.get("messages_column")
    if column is None:
        turns = [("system", instructions.get("system_column")), ("user", instructions["prompt_column"]),
                 ("assistant", instructions["response_column"])]
        messages = []
        for role, name in turns:
            if name is None:
                continue
            value = row.get(name)
            if value is None and role != "system":
                raise BadExample(f"no value in the column {name!r}")
            if value is not None:
                messages.append({"role": role, "content": str(value)})
        return messages
    value = row.get(column)
    if isinstance(value, str):  # JSON text (CSV, or a JSONL file read line by line)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadExample(f"the column {column!r} is not a list of turns (not JSON)") from None
    if not isinstance(value, list) or not value:
        raise BadExample(f"no turns in the column {column!r}")
    messages = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise BadExample(f"turn {number} of {column!r} is not {{role, content}} with text")
        if turn["role"] not in ROLES:
            raise BadExample(f"turn {number} of {column!r} has the unknown role {turn['role']!r} (roles: {', '.join(ROLES)})")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadExample(f"no assistant turn in {column!r} to learn from")
    return messages


def segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, (text, learned): before each assistant turn, what the
    chat template renders up to its generation prompt; then the turn itself. Turns after the last
    assistant one are dropped (nothing to learn)."""
    def render(turns: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], True), render(messages[: index + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise BadExample("the chat template does not render this conversation turn by turn as a prefix of the whole "
                             "(it rewrites earlier turns); set data.instructions.template")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return [(text, learned) for text, learned in pieces if text]


def encode(tokenizer, messages: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels (IGNORE where not learned) of one example, at most seq_len + 1 long
    (the tail cut); BadExample where no learned token is left within it."""
    pieces = segments(tokenizer, messages)
    encoded = tokenizer.backend_tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False)
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encoded])
    labels = np.concatenate([np.asarray(e.ids, dtype=np.int32) if learned else np.full(len(e.ids), IGNORE, np.int32)
                             for e, (_, learned) in zip(encoded, pieces)])
    if not (labels[1: seq_len + 1] != IGNORE).any():  # a label is a target from the second token on
        first = int(np.argmax(labels != IGNORE))
        raise BadExample(f"the prompt takes {first} tokens, leaving no room for the response within model.seq_len "
                         f"{seq_len}; raise model.seq_len or shorten the prompt")
    return ids[: seq_len + 1], labels[: seq_len + 1]


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, packed: bool) -> dict:
    """Rows of seq_len + 1: one example each, right-padded (labels IGNORE), or (`packed`) as many
    whole examples as fit, in order, with `positions` restarting at each example (and at the
    padding, which is then a sequence of its own). `first`: each row's first example's index."""
    width = seq_len + 1
    rows, current, used = [], [], 0
    for index, (ids, _) in enumerate(examples):
        if current and (not packed or used + len(ids) > width):
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += len(ids)
    if current:
        rows.append(current)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    labels = np.full((len(rows), width), IGNORE, np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    for row, members in enumerate(rows):
        at = 0
        for index in members:
            ids, learned = examples[index]
            tokens[row, at: at + len(ids)], labels[row, at: at + len(ids)] = ids, learned
            positions[row, at: at + len(ids)] = np.arange(len(ids))
            at += len(ids)
        positions[row, at:] = np.arange(width - at)
    out = {"tokens": tokens, "labels": labels, "first": np.array([m[0] for m in rows], dtype=np.int64)}
    if packed:
        out["positions"] = positions
    return out


def columns_of(instructions: dict) -> list[tuple[str, str]]:
    """(field, column) of the columns instruction rows are read from."""
    if instructions.get("messages_column") is not None:
        return [("messages_column", instructions["messages_column"])]
    return [(f, instructions[f]) for f in ("prompt_column", "response_column", "system_column") if instructions.get(f)]


def check_columns(data: dict, files: Files) -> None:
    """The conversation's columns in the first file."""
    fmt = format_of(files) if data["format"] == "auto" else data["format"]
    columns = peek_columns(files, fmt)
    for field, name in columns_of(data["instructions"]):
        if name not in columns:
            raise DataError([f"data.instructions.{field}: {name!r} is not a column of {files.paths[0]} "
                             f"(columns: {', '.join(columns)})"])


def preprocess_instructions(data: dict, files: Files, seq_len: int, writer, out_dir: Path, problems: Problems,
                            hf: HfTokenizer, packed: bool) -> dict:
    """Read, render, tokenize and write the examples (one task per read block); `packed`: several
    per row, for a model whose attention separates them by position (the caller knows the model)."""
    instructions = data["instructions"]
    check_columns(data, files)
    fmt = format_of(files) if data["format"] == "auto" else data["format"]
    tokens = tokenization(data, hf, None, out_dir)
    tokenizer = with_chat_template(tokens.transformers, instructions)
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))  # with the chat template the data was rendered with
    pad = tokens.record()["special_tokens"]["pad_token_id"]
    # Python functions: prompts that leave room for a response (a byte-level token is at least a byte)
    prompt_bytes = seq_len // 2 if fmt == "python" else None
    rows = read_tables(files, fmt, problems, data["batch_size"], prompt_bytes).map_batches(
        _examples, fn_kwargs={"tokenizer": tokenizer, "instructions": instructions, "seq_len": seq_len, "pad_id": pad,
                              "packed": packed, "key": data["key_column"], "relative": files.relative,
                              "seed": data["seed"], "val_fraction": data["val_fraction"],
                              "test_fraction": data["test_fraction"], "problems": problems},
        batch_format="pyarrow", batch_size=None)
    counts, _ = writer(rows)
    if not sum(counts.values()):
        where = ", ".join(files.paths[:3]) + (f" and {len(files.paths) - 3} more" if len(files.paths) > 3 else "")
        why = (f"no documented function whose signature and docstring fit in {prompt_bytes} bytes (half of model.seq_len); "
               f"raise model.seq_len or read other files") if fmt == "python" else "every row was bad"
        raise DataError([f"data.source: no instruction examples in {where}: {why}"])
    for name, count in counts.items():
        if count == 0:
            raise DataError([f"data.{name}_fraction: the {name} split is empty ({sum(counts.values())} rows in all); use "
                             f"more data or a larger fraction"])
    return {"format": fmt, "files": len(files.paths), "task": "lm", **tokens.record(), "num_classes": tokens.vocab_size,
            "classes": None, "input_shape": [seq_len], "stored_shape": [seq_len + 1], "seq_len": seq_len, "rows": counts,
            "tokens": {k: v * seq_len for k, v in counts.items()}, "augment": [], "seed": data["seed"],
            "instructions": {"packed": packed, "chat_template": tokenizer.chat_template}}


def _examples(batch: pa.Table, tokenizer, instructions: dict, seq_len: int, pad_id: int, packed: bool, key: str | None,
              relative, seed: int, val_fraction: float, test_fraction: float, problems: Problems) -> dict:
    """A read block's rows as examples, each keyed (key column, or file and row) and split;
    packed within each split in the block's order."""
    file = batch[FILE][0].as_py() if batch.num_rows else ""
    needed = [name for _, name in columns_of(instructions)] + ([key] if key else [])
    missing = [name for name in needed if name not in batch.column_names]
    if missing:
        raise DataError([f"{file}: no column {missing[0]!r} (the first file has it); make the files' schemas agree"])
    records = batch.select([n for n in needed if n != key]).to_pylist()
    numbers = batch[ROW].to_numpy()
    names = batch[key].cast(pa.string()).to_pylist() if key else [f"{relative(file)}\0{n}" for n in numbers]
    examples, kept, bad = [], [], []
    for index, record in enumerate(records):
        try:
            examples.append(encode(tokenizer, conversation(record, instructions), seq_len))
            kept.append(index)
        except BadExample as exc:
            bad.append((file, int(numbers[index]), str(exc)))
    problems(bad)
    keys = row_keys([names[i] for i in kept]) if kept else np.zeros(0, np.uint64)
    splits = split_of(keys, seed, val_fraction, test_fraction)
    parts = []
    for split in np.unique(splits):
        members = np.flatnonzero(splits == split)
        rows = pack([examples[i] for i in members], seq_len, pad_id, packed)
        rows["key"] = keys[members[rows.pop("first")]].view(np.int64)
        rows["split"] = np.full(len(rows["key"]), split, dtype=np.int8)
        parts.append(rows)
    if not parts:
        empty = {"tokens": np.zeros((0, seq_len + 1), np.int32), "labels": np.zeros((0, seq_len + 1), np.int32),
                 "key": np.zeros(0, np.int64), "split": np.zeros(0, np.int8)}
        return empty | ({"positions": np.zeros((0, seq_len + 1), np.int32)} if packed else {})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
