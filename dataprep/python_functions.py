"""Python source files as instruction data (`data.format: python`, e.g. `source: python-stdlib`):
each function with a docstring and a body is a pair, the prompt its signature and docstring, the
response the rest of its body, both as written (dedented to the `def`). Real instruction data on
every machine, nothing downloaded."""

from __future__ import annotations

import ast

PROMPT, RESPONSE = "prompt", "response"
MAX_RESPONSE_LINES = 80  # longer bodies are mostly tables and dispatchers, poor examples


def function_pairs(source: str, prompt_bytes: int | None = None) -> dict[str, list]:
    """A file's (prompt, response) pairs and the line of each `def`; a prompt longer than
    `prompt_bytes` is left out (it would leave no room for the response). A file that is not
    valid Python gives none."""
    pairs = {PROMPT: [], RESPONSE: [], "line": []}
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return pairs
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node) is None or node.end_lineno - node.body[1].lineno >= MAX_RESPONSE_LINES:
            continue
        indent = node.col_offset
        prompt = "\n".join(line[indent:] for line in lines[node.lineno - 1: node.body[0].end_lineno])
        response = "\n".join(line[indent:] for line in lines[node.body[1].lineno - 1: node.end_lineno])
        if prompt_bytes is not None and len(prompt.encode()) > prompt_bytes:
            continue
        pairs[PROMPT].append(prompt)
        pairs[RESPONSE].append(response)
        pairs["line"].append(node.lineno)
    return pairs
