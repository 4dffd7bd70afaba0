"""A transformers student derived from its teacher (`distill.student: {type: hf, overrides: {...}}`):
the teacher's config with the overrides, on the teacher's tokenizer, started from fresh weights or
from every k-th of the teacher's layers, as DistilBERT was from BERT (Sanh et al., 2019).

Each worker writes the student's starting folder (config, the teacher's code if it has its own,
and the copied weights) to a folder of its own and builds it through `from_pretrained`, so that
ZeRO-3 partitions it as it loads, as it does any pretrained model.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

LAYER_KEY = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
"""A weight of a numbered layer: `model.layers.3.mlp.up_proj.weight` -> (model.layers, 3, mlp.up_proj.weight)."""
LAYER_COUNT = "num_hidden_layers"
HEADS = ("num_attention_heads", "num_key_value_heads", "head_dim")


def student_config(teacher, overrides: dict):
    """The teacher's transformers config with `overrides` set. A name the teacher's config does not
    have is refused (a typo would otherwise become a setting nothing reads); settings the config
    derives from others (the per-layer `layer_types`, `head_dim`) follow the overrides."""
    unknown = [key for key in overrides if not hasattr(teacher, key)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*teacher.to_dict(), *teacher.attribute_map], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; see the teacher's config.json for its {teacher.model_type} settings"
        raise ValueError(f"distill.student.overrides: {unknown[0]} is not a setting of the teacher's {teacher.model_type} "
                         f"config{hint}")
    values = teacher.to_dict()
    changed = {teacher.attribute_map.get(key, key): value for key, value in overrides.items()}
    values.update(changed)
    count = teacher.attribute_map.get(LAYER_COUNT, LAYER_COUNT)  # GPT-2's n_layer
    before, after = getattr(teacher, LAYER_COUNT, None), values.get(count)
    types = values.get("layer_types")
    if isinstance(types, list) and len(types) == before and after != before and "layer_types" not in changed:
        # The student's layer i is the teacher's layer kept[i]: it keeps that layer's kind.
        if isinstance(after, int) and 1 <= after <= before:
            values["layer_types"] = [types[j] for j in kept_layers(before, after)]
        else:
            values.pop("layer_types")
    widths = {"hidden_size", "num_attention_heads"} & set(changed)
    heads = getattr(teacher, "num_attention_heads", None)
    if widths and "head_dim" not in changed and heads and values.get("head_dim") == teacher.hidden_size // heads:
        values.pop("head_dim")
    try:
        return type(teacher).from_dict(values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"distill.student.overrides: {' '.join(str(exc).split())[:300]}") from None


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layers a student of `student_layers` starts from: every k-th, from the first,
    k = teacher_layers // student_layers (12 -> 6: layers 0, 2, ..., 10)."""
    k = teacher_layers // student_layers
    return [i * k for i in range(student_layers)]


def layer_list(keys, layers: int) -> str | None:
    """The key prefix of the decoder's list of layers: the one numbered exactly 0..layers-1 (None:
    no such list, or more than one)."""
    indices = defaultdict(set)
    for key in keys:
        match = LAYER_KEY.match(key)
        if match:
            indices[match[1]].add(int(match[2]))
    found = [prefix for prefix, seen in indices.items() if seen == set(range(layers))]
    return found[0] if len(found) == 1 else None


def renumbered(key: str, prefix: str, layers: dict[int, int]) -> str | None:
    """`key` with its layer under `prefix` numbered as `layers` maps it (None: a layer it leaves
    out); weights outside the layer list keep their name."""
    match = LAYER_KEY.match(key)
    if not (match and match[1] == prefix):
        return key
    index = layers.get(int(match[2]))
    return None if index is None else f"{prefix}.{index}.{match[3]}"


def layer_init_problem(teacher, student, trust_remote_code: bool = False) -> str | None:
    """Why a student of config `student` cannot start from the teacher's layers (None: it can):
    every weight of the student must be a teacher weight of the same shape. Both models are built
    on the meta device (no memory)."""
    before, after = getattr(teacher, LAYER_COUNT, None), getattr(student, LAYER_COUNT, None)
    if not isinstance(before, int) or not isinstance(after, int):
        return f"the {teacher.model_type} config has no {LAYER_COUNT}"
    if after > before:
        return f"the student has {after} layers, more than the teacher's {before}"
    teacher_shapes, student_shapes = _shapes(teacher, trust_remote_code), _shapes(student, trust_remote_code)
    prefix = layer_list(teacher_shapes, before)
    if prefix is None:
        return f"raylaunch finds no list of {before} layers among the {teacher.model_type} model's weights"
    sources = dict(enumerate(kept_layers(before, after)))  # student layer -> teacher layer
    for key, shape in student_shapes.items():
        source = renumbered(key, prefix, sources)
        if teacher_shapes.get(source) != shape:
            theirs = tuple(teacher_shapes[source]) if source in teacher_shapes else "none"
            return f"the student's {key} has shape {tuple(shape)} and the teacher's {source} {theirs}"
    # Weights of the same shape over other heads would compute something else.
    regrouped = [name for name in HEADS if getattr(teacher, name, None) != getattr(student, name, None)]
    if regrouped:
        return f"the student's {regrouped[0]} is {getattr(student, regrouped[0])}, the teacher's {getattr(teacher, regrouped[0])}"
    return None


def init_refusal(problem: str) -> str:
    return (f"distill.student.init: teacher_layers copies the teacher's weights, but {problem}; change only "
            f"{LAYER_COUNT} in distill.student.overrides, or set init: fresh")


def _shapes(config, trust_remote_code: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {key: value.shape for key, value in model.state_dict().items()}


def derive_student(section: dict, teacher_dir: Path, target: Path) -> tuple[dict, bool]:
    """Write the starting folder of the student `section` describes (its `overrides` of the
    exported teacher in `teacher_dir`) to `target`: its config.json, the teacher's model code if it
    runs its own, and with `init` teacher_layers (or auto, where the overrides allow it) the
    teacher's weights of every k-th layer, its embeddings, final norm and head. Returns the section
    that builds the student from there, and whether it loads those weights (else fresh ones)."""
    from transformers import AutoConfig

    # A teacher of its own code (auto_map: its run trusted that code) has a student of the same code.
    trust = "auto_map" in json.loads((teacher_dir / "config.json").read_text())
    teacher = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=trust)
    student = student_config(teacher, section["overrides"])
    problem = layer_init_problem(teacher, student, trust) if section["init"] != "fresh" else "fresh"
    if section["init"] == "teacher_layers" and problem:
        raise ValueError(init_refusal(problem))
    target.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(target)
    for code in teacher_dir.glob("*.py"):  # a model of its own code: the student runs the same code
        shutil.copyfile(code, target / code.name)
    copies = problem is None
    if copies:
        _copy_layers(teacher_dir, target, teacher.num_hidden_layers, kept_layers(teacher.num_hidden_layers,
                                                                                 student.num_hidden_layers))
    built = {**section, "name_or_path": str(target), "hf_config": None, "overrides": None, "init": "auto",
             "trust_remote_code": trust}
    return built, copies


def _copy_layers(teacher_dir: Path, target: Path, layers: int, kept: list[int]) -> None:
    """The teacher's weights, one tensor at a time, with only the `kept` layers, renumbered."""
    from huggingface_hub import save_torch_state_dict
    from safetensors import safe_open

    from trainers.models.hf import MAX_SHARD_SIZE

    files = {}
    for file in sorted(teacher_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            files[file] = list(f.keys())
    prefix = layer_list([key for keys in files.values() for key in keys], layers)
    targets = {j: i for i, j in enumerate(kept)}  # teacher layer -> student layer
    weights = {}
    for file, keys in files.items():
        with safe_open(file, "pt") as f:
            for key in keys:
                name = renumbered(key, prefix, targets)
                if name is not None:
                    weights[name] = f.get_tensor(key)
    save_torch_state_dict(weights, target, max_shard_size=MAX_SHARD_SIZE)


def tokenizer_difference(teacher: str, student: str, trust_remote_code: bool = False) -> str | None:
    """How the tokenizer in `student` (a folder or hub id) differs from the teacher's (None: it is
    the same: every token at the same id, the same start, end and padding tokens)."""
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code) for where in (teacher, student))
    ours, theirs = a.get_vocab(), b.get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        return f"its {len(theirs)} tokens are not the teacher's {len(ours)}: {differ} ids differ"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, name) != getattr(b, name):
            return f"its {name} is {getattr(b, name)}, the teacher's {getattr(a, name)}"
    return None
