"""The model directory: the one format every model raylaunch writes and reads, of every kind.

    model.safetensors   the weights: fp32, or a quantized model's tensors (int8 data and scales), never pickles
    model.json          the spec: how to rebuild the model (`format`: fp32, torchao or pt2e; the architecture;
                        the quantization) and how raw input becomes its input (`preprocess`: feature columns,
                        normalization fitted on the train split, image shape, tokenizer)
    tokenizer.json      a BPE language model's tokenizer
    config.json, ...    a transformers model (`model.type: hf`): the folder transformers' own `from_pretrained`
                        loads (config, generation config, weights sharded above 5 GB, tokenizer files), beside
                        model.json; the spec's `files` lists the model's files
    model.pt2           optional, static_int8 only: its program compiled ahead of time by AOTInductor for a
                        CPU and torch version (machine code: loaded only when asked for)

Rank 0 writes the fp32 kind at every checkpoint (`save_model_dir`), the quantize stage the quantized
kinds (`quantize_model_dir`); `load_model` reads any of them. The quantization methods themselves are
`trainers.quantize`; inference on raw input is `trainers.predict`.

    from trainers.modeldir import load_model
    model, spec = load_model("runs/quickstart/models/student-static_int8", compiled=True)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dataprep import TOKENIZER_FILE, DataError
from dataprep.meta import DataMeta
from trainers.models import build_model
from trainers.quantize import PT2E, flat_state, graph_state, quantize_model, set_graph_state, unflatten_state

WEIGHTS, SPEC, PROGRAM = "model.safetensors", "model.json", "model.pt2"


# ---- spec

# What turns raw input into the model's input (trainers.predict reads these for `raylaunch predict`).
PREPROCESS_KEYS = ("task", "format", "feature_columns", "stored_shape", "normalize", "augment", "seed", "tokenizer",
                   "vocab_size", "seq_len", "special_tokens", "text_column", "instructions")


def model_spec(model: dict, data_meta: DataMeta) -> dict:
    """What rebuilds a model and feeds it: its config section, the data's shape and classes, and
    the preprocessing its inputs went through (normalization statistics, tokenizer)."""
    return {"format": "fp32", "model": model, "input_shape": data_meta["input_shape"],
            "num_classes": data_meta["num_classes"], "classes": data_meta["classes"],
            "preprocess": {k: data_meta[k] for k in PREPROCESS_KEYS if k in data_meta}}


def read_spec(directory: Path | str) -> dict:
    """A model directory's `model.json`, with the directory it came from (`directory`)."""
    directory = Path(directory)

    def missing(name: str) -> DataError:
        models = sorted(p.parent.name for p in (directory / "models").glob(f"*/{SPEC}"))
        hint = (f"it is a run directory: give one of its models ({', '.join(f'{directory}/models/{m}' for m in models)})"
                if models else "give a folder under RUN_DIR/models/")
        return DataError([f"{directory}: not a model directory (no {name}); {hint}"])

    if not (directory / SPEC).is_file():
        raise missing(SPEC)
    try:
        spec = json.loads((directory / SPEC).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError([f"{directory / SPEC}: not valid JSON ({exc}); export the model again"]) from None
    absent = next((name for name in model_files(spec) if not (directory / name).is_file()), None)
    if absent:
        raise missing(absent)
    return {**spec, "directory": str(directory.resolve())}


# ---- fp32: what training writes

def save_model_dir(directory: Path, state_dict: dict[str, torch.Tensor], spec: dict, model: nn.Module | None = None) -> None:
    """Write weights and spec; each file goes to a temporary name first and is renamed into place,
    so a reader never sees half a file. A transformers model (`model`: its `CausalLM`, for its
    config) is written as a transformers folder, the spec listing its files."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    if spec["model"].get("lora"):  # a LoRA checkpoint: the adapter alone (`export_adapter` merges it)
        from trainers.models.hf import save_adapter

        spec = {**spec, "files": save_adapter(directory, model.hf, tensors), "adapter_only": True}
    elif spec["model"].get("type") == "hf":
        from trainers.models.hf import remote_code_files, save_hf

        code = remote_code_files(model.hf) if spec["model"].get("trust_remote_code") else []
        files = save_hf(directory, tensors, model.hf.config, spec["preprocess"].get("special_tokens", {}), code)
        spec = {**spec, "files": files}
    else:
        atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / SPEC, lambda p: p.write_text(json.dumps(spec, indent=1)))


ADAPTER_DIR = "adapter"


def export_adapter(directory: Path) -> None:
    """A LoRA checkpoint's model folder (its adapter alone) made an export: the base model with the
    adapter merged, as a plain transformers folder, and the adapter in PEFT's layout under
    adapter/ (the spec records its settings and files). Anything else is left as it is."""
    if not json.loads((directory / SPEC).read_text()).get("adapter_only"):
        return
    merged, spec = load_model_dir(directory)  # the base with the adapter merged
    adapter = directory / ADAPTER_DIR
    adapter.mkdir()
    for name in model_files(spec):
        (directory / name).rename(adapter / name)
    weights, seen = {}, set()
    for name, tensor in merged.state_dict().items():  # a tied head once, as training writes it
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor
    section = {k: v for k, v in spec["model"].items() if k != "lora"}
    exported = {k: v for k, v in spec.items() if k not in ("adapter_only", "files")}
    exported |= {"model": section, "lora": spec["model"]["lora"],
                 "adapter": {"dir": ADAPTER_DIR, "files": model_files(spec)}}
    save_model_dir(directory, weights, exported, merged)


def model_files(spec: dict) -> list[str]:
    """The files of a model directory besides model.json (and a tokenizer copied in beside them)."""
    return spec.get("files") or [WEIGHTS]


def weights_bytes(directory: Path | str) -> int:
    """Bytes of a model directory's weights (every safetensors shard)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def load_model_dir(directory: Path | str) -> tuple[nn.Module, dict]:
    """The fp32 model in `directory`, in eval mode, and its spec."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC).read_text())
    if spec.get("adapter_only"):
        from trainers.models.hf import DATA_TASKS, WRAPPERS, merged_with_adapter

        task = DATA_TASKS[spec["preprocess"]["task"]]
        return WRAPPERS[task](merged_with_adapter(spec["model"], directory, task, spec["classes"])), spec
    if spec["model"]["type"] == "hf":
        from trainers.models.hf import DATA_TASKS, load_hf

        return load_hf(directory, DATA_TASKS[spec["preprocess"]["task"]], spec["model"].get("trust_remote_code", False)), spec
    model = build_model(spec["model"], spec["input_shape"], spec["num_classes"])
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval(), spec


# ---- quantized: torchao's tensors, or a PT2E program's

def quantize_model_dir(source: Path, target: Path, method: str, calibration: torch.Tensor | None = None,
                       compile: bool = False) -> nn.Module:
    """Quantize the fp32 model in `source` and export it to `target`; returns the quantized model.
    `compile`: a static_int8 program is also compiled ahead of time for this machine (`model.pt2`)."""
    model, spec = load_model_dir(source)
    quantized = quantize_model(model, method, calibration)
    spec = {**spec, "format": "pt2e" if method == PT2E else "torchao",
            "quantization": {"method": method, "source": source.name,
                             **({"calibration_rows": len(calibration)} if method == PT2E else {})}}
    tensors, literals = graph_state(quantized) if method == PT2E else (flat_state(quantized), None)
    if literals is not None:
        spec["quantization"]["graph_constants"] = literals
    target.mkdir(parents=True, exist_ok=True)
    (target / PROGRAM).unlink(missing_ok=True)  # a resumed stage's earlier export: model.json is rewritten below
    if (source / TOKENIZER_FILE).exists():
        shutil.copy2(source / TOKENIZER_FILE, target / TOKENIZER_FILE)
    if spec["model"]["type"] == "hf":
        # The transformers folder's config (the architecture to rebuild), its code (trust_remote_code),
        # generation config and tokenizer travel; its fp32 weights (and a LoRA adapter) do not.
        for path in source.iterdir():
            weights = path.suffix == ".safetensors" or path.name == "model.safetensors.index.json"
            if path.is_file() and path.name != SPEC and not weights:
                shutil.copy2(path, target / path.name)
        spec.pop("files", None)
        spec.pop("adapter", None)
    atomic_write(target / WEIGHTS, lambda p: save_file(tensors, str(p)))
    inputs = calibration if calibration is not None else _zeros(spec, 4)
    if compile and method == PT2E:
        try:
            spec["compiled"] = _compile(quantized, target / PROGRAM, inputs[:2])
        except CompileError as exc:  # exported all the same: the reference program runs, and says why
            spec["not_compiled"] = str(exc)
    atomic_write(target / SPEC, lambda p: p.write_text(json.dumps(spec, indent=1)))
    _check_round_trip(quantized, target, inputs)
    return quantized


def load_quantized_dir(directory: Path | str, compiled_program: bool = False) -> tuple[nn.Module, dict]:
    """A quantized model exported by `quantize_model_dir`, ready for inference, rebuilt from its
    tensors; with `compiled_program`, its compiled program where it has one that runs here.

    A compiled program is machine code: loading it runs code from the model folder. So it is
    loaded only when asked (`raylaunch predict --compiled`; the run that built it measures it),
    and only as `model.pt2` inside the folder: a model.json naming any other file is refused."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC).read_text())
    method = spec["quantization"]["method"]
    compiled = spec.get("compiled")
    if compiled:
        _check_program_path(directory, compiled)
    if compiled and compiled_program:
        here = compiled_for()
        differs = [f"{key} {compiled[key]} (here {here[key]})" for key in ("cpu", "torch") if compiled[key] != here[key]]
        if not differs and (directory / PROGRAM).is_file():
            return CompiledProgram(directory / PROGRAM), {**spec, "program": PROGRAM}
        why = f"{PROGRAM} was compiled for {', '.join(differs)}" if differs else f"{PROGRAM} is missing"
        spec = {**spec, "program": f"the reference program: {why}"}
    elif compiled:
        spec = {**spec, "program": f"the reference program: {PROGRAM} runs only when asked for (--compiled)"}
    elif spec.get("not_compiled"):
        spec = {**spec, "program": f"the reference program: {spec['not_compiled']}"}
    # The architecture's own weights are replaced below; a fixed seed keeps loading deterministic.
    torch.manual_seed(0)
    if spec["model"]["type"] == "hf":  # the architecture from the folder's own config.json
        from transformers import AutoConfig

        from trainers.models.hf import DATA_TASKS, WRAPPERS, auto_class

        task, trust = DATA_TASKS[spec["preprocess"]["task"]], spec["model"].get("trust_remote_code", False)
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust)
        fresh = WRAPPERS[task](auto_class(task).from_config(config, trust_remote_code=trust))
    else:
        fresh = build_model(spec["model"], spec["input_shape"], spec["num_classes"])
    saved = load_file(str(directory / WEIGHTS))
    if method == PT2E:
        model = quantize_model(fresh, PT2E, _zeros(spec, 2))
        set_graph_state(model, saved, spec["quantization"]["graph_constants"], str(directory / WEIGHTS))
    else:
        model = quantize_model(fresh, method)
        model.load_state_dict(unflatten_state(model.state_dict(), saved), assign=True)
    return model, spec


def _check_program_path(directory: Path, compiled: dict) -> None:
    """Refuse a model.json whose compiled program is anything but `model.pt2` inside its folder (a
    path out of it, or a model.pt2 that links elsewhere): loading it would run that file's code."""
    program = directory / PROGRAM
    if compiled.get("file") != PROGRAM or (program.exists() and program.resolve().parent != directory.resolve()):
        where = compiled.get("file") if compiled.get("file") != PROGRAM else f"{PROGRAM} -> {program.resolve()}"
        raise DataError([f"{directory / SPEC}: compiled.file names {where!r}, outside the model folder; a compiled "
                         f"program is only ever {PROGRAM} in the folder itself: export the model again"])


def _zeros(spec: dict, rows: int) -> torch.Tensor:
    """Inputs of the model's shape (token ids for a language model)."""
    if spec["preprocess"]["task"] == "lm":
        return torch.zeros(rows, *spec["input_shape"], dtype=torch.long)
    return torch.zeros(rows, *spec["input_shape"])


@torch.inference_mode()
def _check_round_trip(quantized: nn.Module, target: Path, inputs: torch.Tensor) -> None:
    """The export reproduces the quantized model: rebuilt from its tensors, to float rounding; its
    compiled program, to within 1% of the outputs' range (its int8 kernels round some activations
    to the neighbouring int8 step where the reference program's fp32 operators do not)."""
    inputs = inputs[:64]
    expected = quantized(inputs)
    rebuilt, spec = load_quantized_dir(target, compiled_program=False)
    if not torch.allclose(rebuilt(inputs), expected, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"{target}: the exported quantized model does not reproduce the quantized model's outputs")
    if spec.get("compiled"):
        program, spec = load_quantized_dir(target, compiled_program=True)
        difference = (program(inputs) - expected).abs().max().item()
        allowed = 0.01 * (expected.max() - expected.min()).item()
        if spec["program"] != spec["compiled"]["file"] or difference > allowed:
            raise RuntimeError(f"{target / PROGRAM}: the compiled program differs from the quantized model by up to "
                               f"{difference:.4g} (allowed {allowed:.4g}); set quantize.compile: false to export without it")


# ---- any kind

def load_model(path: Path | str, compiled: bool = False) -> tuple[nn.Module, dict]:
    """Any exported model (fp32, torchao-quantized or PT2E static int8), ready for inference on
    CPU, with its spec. Nothing is unpickled: weights are safetensors, the spec JSON. `compiled`: a
    static_int8 model runs its compiled program (`model.pt2`, machine code: only from runs you trust)
    where it was compiled for this CPU and torch."""
    spec = read_spec(path)
    if spec.get("quantization"):
        model, spec = load_quantized_dir(path, compiled_program=compiled)
    else:
        model, spec = load_model_dir(path)
    return model, {**spec, "directory": str(Path(path).resolve())}

# ---- a static_int8 program compiled ahead of time

def compiled_for() -> dict:
    """What an AOTInductor program's machine code depends on: the CPU's architecture and the
    vector instructions inductor generates for it, and the torch version."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"cpu": f"{platform.machine()} {pick_vec_isa() or 'without vector instructions'}", "torch": torch.__version__}


@torch.no_grad()
def _compile(program: nn.Module, path: Path, example: torch.Tensor) -> dict:
    """`program` compiled by AOTInductor into a package at `path` (written whole or not at all);
    the batch dimension stays dynamic, as in the program."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

    exported = torch.export.export(program, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))

    # Inductor compiles with -march=native: machine code for this very CPU model, which another CPU
    # with the same vector instructions may not run (SIGILL). On x86 the baseline architecture plus
    # the vector ISA's own flags (which inductor adds) make it need exactly what model.json records.
    configs = {"cpp.march": "x86-64"} if platform.machine() in ("x86_64", "AMD64") else {}

    def package(tmp: Path) -> None:
        with tmp.open("wb") as file:  # a file object: AOTInductor wants a path ending in .pt2
            aoti_compile_and_package(exported, package_path=file, inductor_configs=configs)

    try:
        atomic_write(path, package)
    except (InductorError, InvalidCxxCompiler, CppCompileError) as exc:
        # Only a C++ compiler that is missing or cannot build the code (inductor needs one, as
        # DeepSpeed's ops do) exports the model without its program; any other failure is a bug.
        inner = getattr(exc, "inner_exception", exc)
        if not isinstance(inner, (InvalidCxxCompiler, CppCompileError)):
            raise
        cause = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
        raise CompileError(f"AOTInductor could not compile {path.parent.name}'s program ({type(inner).__name__}: "
                           f"{cause}); install g++ (or set CXX to a C++ compiler) and quantize again, or set "
                           f"quantize.compile: false") from None
    return {"file": PROGRAM, **compiled_for(), "bytes": path.stat().st_size}


class CompileError(RuntimeError):
    """AOTInductor could not compile a program (the model is exported without it)."""


class CompiledProgram(nn.Module):
    """An AOTInductor package as a module (eval mode, no parameters of its own)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = str(path)
        self.runner = torch._inductor.aoti_load_package(self.path)
        self.eval()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.runner(inputs)


def atomic_write(path: Path, write) -> None:
    """`write(temporary path)`, then rename it to `path`: a reader never sees half a file, and a
    write that fails leaves nothing behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
