"""The config reference (docs/reference.md), generated from the pydantic models (a test keeps them equal)."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from pydantic import BaseModel

from runconfig.schema import RunConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return "transform"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if annotation is type(None) else annotation.__name__


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) and name != "student":
            rows += _rows(field.annotation, f"{path}.")
            continue
        default = field.default.model_dump(mode="json") if isinstance(field.default, BaseModel) else field.default
        rows.append(f"| `{path}` | {_type_name(field.annotation)} | `{json.dumps(default)}` | {field.description or ''} |")
        optional = [a for a in typing.get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if optional:  # a section that is off (null) unless given: its own keys follow it
            rows += _rows(optional[0], f"{path}.")
    return rows


def _transform_rows() -> list[str]:
    """`data.transforms` entries: a name, or a mapping with `type` and these options."""
    from runconfig.schema import TRANSFORM_TYPES

    rows = ["", "`data.transforms` entries (a name, or a mapping with `type:` and options):", "",
            "| type | options | what it does |", "|---|---|---|"]
    for kind, model in TRANSFORM_TYPES.items():
        options = [f"`{name}` ({_type_name(f.annotation)}, {'required' if f.is_required() else json.dumps(f.default)}): {f.description}"
                   for name, f in model.model_fields.items() if name != "type"]
        rows.append(f"| `{kind}` | {'<br>'.join(options) or '-'} | {model.model_fields['type'].description} |")
    return rows


def reference_markdown() -> str:
    """One table per section of the config."""
    out = [BEGIN]
    for section, field in RunConfig.model_fields.items():
        out += ["", f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(field.annotation, f"{section}.")
        if section == "data":
            out += _transform_rows()
    out += ["", END]
    return "\n".join(out)


def write_reference(page: Path = Path(__file__).parent.parent / "docs" / "reference.md") -> None:
    """Regenerate the reference between its markers in `page`, leaving the page's introduction."""
    text = page.read_text()
    page.write_text(text[:text.index(BEGIN)] + reference_markdown() + text[text.index(END) + len(END):])
