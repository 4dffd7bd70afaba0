"""Post-training quantization with torchao, and the quantized model's export.

Methods (torch 2.13 deprecates `torch.ao.quantization` in favour of torchao):
- `int8_dynamic`, `int8_weight_only`, `int4_weight_only`: torchao's `quantize_`, which swaps each
  nn.Linear's weight for a quantized tensor subclass in place (convolutions stay fp32);
- `static_int8`: the PT2E flow: `torch.export` the model, insert observers for the x86 backend
  (convolutions and linears, weights per channel, activations per tensor), calibrate them on rows
  of the validation split, convert to quantize/dequantize ops around int8 weights. Eagerly the
  program runs reference ops; `torch.compile` (inductor) lowers the patterns to int8 kernels.

Export: `model.safetensors` holds only the quantized tensors (int8 data and its scales, never
pickles), `model.json` the architecture and the method. Loading rebuilds the architecture, applies
the same quantization to it (for PT2E: export, prepare and convert the same graph, calibrated on
zeros) and then puts the saved tensors (and, for PT2E, the activation scales the graph holds as
constants) in place. Saving checks that the loaded model gives the same outputs as the one saved.

A static_int8 export also holds, by default (`quantize.compile`), `model.pt2`: the program compiled
ahead of time by AOTInductor into int8 kernels for this machine's CPU (its vector ISA) and torch
version, which `model.json` records. Loading runs it where both match and the reference program
rebuilt from the tensors above otherwise, saying why in the spec's `program`. At small batches the
compiled program is several times faster than the reference one, which quantizes and dequantizes
around fp32 operators (bench/RESULTS.md). Where it cannot be compiled (no C++ compiler), the model
is exported without it and `model.json` says why (`not_compiled`).
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from dataprep import TOKENIZER_FILE, DataError
from trainers.checkpoint import SPEC, WEIGHTS, atomic_write, load_model_dir
from trainers.models import build_model

METHODS = ("int8_dynamic", "int8_weight_only", "static_int8", "int4_weight_only")
PT2E = "static_int8"
PROGRAM = "model.pt2"
_SEP = ":"  # a subclass tensor's inner tensors are saved as "<state dict key>:<inner name>"


def _torchao_config(method: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"int8_dynamic": Int8DynamicActivationInt8WeightConfig, "int8_weight_only": Int8WeightOnlyConfig,
            "int4_weight_only": Int4WeightOnlyConfig}[method]()


def unsupported_reason(method: str) -> str | None:
    """Why `method` cannot run on this machine's CPU with the installed torchao, or None: it is
    tried on a small layer (int4 needs kernels torchao ships only for some devices and builds)."""
    import torchao
    from torchao.quantization import quantize_

    if method == PT2E:
        return None
    probe = nn.Sequential(nn.Linear(256, 64)).eval()
    try:
        quantize_(probe, _torchao_config(method))
        with torch.inference_mode():
            probe(torch.randn(2, 256))
    # What torchao and torch raise for a kernel this build lacks (int4's optional package; an operator
    # with no CPU kernel). Anything else is a bug, and fails the stage with its reason.
    except (ImportError, NotImplementedError) as exc:
        return f"torchao {torchao.__version__} cannot run it on this CPU: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def quantize_model(model: nn.Module, method: str, calibration: torch.Tensor | None = None) -> nn.Module:
    """`model` quantized by `method`: changed in place by `quantize_`, or for `static_int8` a new
    program calibrated on `calibration` (model inputs, e.g. a slice of the validation split)."""
    from torchao.quantization import quantize_

    model.eval()
    if method == PT2E:
        if calibration is None:
            raise ValueError("static_int8 needs calibration inputs")
        return _pt2e(model, calibration)
    quantize_(model, _torchao_config(method))
    return model


@torch.no_grad()
def _pt2e(model: nn.Module, calibration: torch.Tensor, batch_size: int = 256) -> nn.Module:
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    # The batch dimension stays dynamic: calibration, evaluation and serving use other batch sizes.
    program = torch.export.export(model, (calibration[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    prepared = prepare_pt2e(program, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    for start in range(0, len(calibration), batch_size):
        prepared(calibration[start:start + batch_size])
    # `.eval()` on the program then works like on any module (it is already in inference form).
    program = convert_pt2e(prepared)
    allow_exported_model_train_eval(program)
    return program


def quantize_model_dir(source: Path, target: Path, method: str, calibration: torch.Tensor | None = None,
                       compile: bool = False) -> nn.Module:
    """Quantize the fp32 model in `source` and export it to `target`; returns the quantized model.
    `compile`: a static_int8 program is also compiled ahead of time for this machine (`model.pt2`)."""
    model, spec = load_model_dir(source)
    quantized = quantize_model(model, method, calibration)
    spec = {**spec, "format": "pt2e" if method == PT2E else "torchao",
            "quantization": {"method": method, "source": source.name,
                             **({"calibration_rows": len(calibration)} if method == PT2E else {})}}
    tensors, literals = _graph_state(quantized) if method == PT2E else (_flat_state(quantized), None)
    if literals is not None:
        spec["quantization"]["graph_constants"] = literals
    target.mkdir(parents=True, exist_ok=True)
    (target / PROGRAM).unlink(missing_ok=True)  # a resumed stage's earlier export: model.json is rewritten below
    if (source / TOKENIZER_FILE).exists():
        shutil.copy2(source / TOKENIZER_FILE, target / TOKENIZER_FILE)
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
    fresh = build_model(spec["model"], spec["input_shape"], spec["num_classes"])
    saved = load_file(str(directory / WEIGHTS))
    if method == PT2E:
        model = _pt2e(fresh, _zeros(spec, 2))
        _set_graph_state(model, saved, spec["quantization"]["graph_constants"], directory)
    else:
        model = quantize_model(fresh, method)
        model.load_state_dict(_unflatten_state(model.state_dict(), saved), assign=True)
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
    if spec["model"]["type"] == "gpt":
        return torch.zeros(rows, *spec["input_shape"], dtype=torch.long)
    return torch.zeros(rows, *spec["input_shape"])


def _flat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every torchao tensor subclass split into its plain inner tensors."""
    flat = {}
    for key, value in model.state_dict().items():
        if is_traceable_wrapper_subclass(value):
            names, _ = value.__tensor_flatten__()
            flat.update({f"{key}{_SEP}{name}": getattr(value, name).detach().contiguous() for name in names})
        else:
            flat[key] = value.detach().contiguous()
    return flat


def _unflatten_state(template: dict[str, torch.Tensor], flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved inner tensors put back into subclass tensors shaped like the freshly quantized model's."""
    state = {}
    for key, value in template.items():
        if key not in flat:  # saved as its inner tensors
            names, context = value.__tensor_flatten__()
            inner = {name: flat[f"{key}{_SEP}{name}"] for name in names}
            state[key] = nn.Parameter(type(value).__tensor_unflatten__(inner, context, value.shape, value.stride()),
                                      requires_grad=False)
        else:
            state[key] = flat[key]
    return state


def _graph_state(program: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """What distinguishes one calibrated PT2E program from another of the same architecture: the
    tensors its graph reads (int8 weights, their scales, biases) and the numbers its nodes hold
    (activation scales and zero points are literal arguments of the quantize ops)."""
    used = {node.target for node in program.graph.nodes if node.op == "get_attr"}
    tensors = {}
    for key, value in program.state_dict().items():
        if key in used:
            # zero points are int64 holding int8 values: stored small, cast back on load
            small = value.to(torch.int8) if value.dtype == torch.int64 and value.abs().max() <= 127 else value
            tensors[key] = small.detach().contiguous()
    return tensors, [[str(node.target), [a for a in node.args if _is_number(a)]]
                     for node in program.graph.nodes if node.op == "call_function"]


def _is_number(arg) -> bool:
    return isinstance(arg, int | float) and not isinstance(arg, bool)


def _set_graph_state(program: nn.Module, tensors: dict[str, torch.Tensor], literals: list, directory: Path) -> None:
    nodes = [node for node in program.graph.nodes if node.op == "call_function"]
    if [str(n.target) for n in nodes] != [target for target, _ in literals]:
        raise ValueError(f"{directory / WEIGHTS}: the quantized graph differs from the one this torch/torchao builds; "
                         f"quantize the fp32 model again with this version")
    for node, (_, numbers) in zip(nodes, literals):
        values = iter(numbers)
        node.args = tuple(next(values) if _is_number(a) else a for a in node.args)
    program.recompile()
    for key, value in tensors.items():
        owner, _, name = key.rpartition(".")
        module = program.get_submodule(owner) if owner else program
        fresh = getattr(module, name)
        value = value.to(fresh.dtype)
        setattr(module, name, nn.Parameter(value, requires_grad=False) if isinstance(fresh, nn.Parameter) else value)


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
