"""Post-training quantization with torchao: the methods, and the tensors that tell one quantized
model from another of the same architecture. Writing and reading them is `trainers.modeldir`.

Methods (torch 2.13 deprecates `torch.ao.quantization` in favour of torchao):
- `int8_dynamic`, `int8_weight_only`, `int4_weight_only`: torchao's `quantize_`, which swaps each
  nn.Linear's weight for a quantized tensor subclass in place (convolutions stay fp32);
- `static_int8`: the PT2E flow: `torch.export` the model, insert observers for the x86 backend
  (convolutions and linears, weights per channel, activations per tensor), calibrate them on rows
  of the validation split, convert to quantize/dequantize ops around int8 weights. Eagerly the
  program runs reference ops; AOTInductor compiles it to int8 kernels (`trainers.modeldir`).

A quantized model is rebuilt by quantizing a fresh architecture the same way (for PT2E: export,
prepare and convert the same graph, calibrated on zeros) and putting its saved tensors (and, for
PT2E, the activation scales the graph holds as literal arguments) in place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

METHODS = ("int8_dynamic", "int8_weight_only", "static_int8", "int4_weight_only")
PT2E = "static_int8"
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


def flat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every torchao tensor subclass split into its plain inner tensors."""
    flat = {}
    for key, value in model.state_dict().items():
        if is_traceable_wrapper_subclass(value):
            names, _ = value.__tensor_flatten__()
            flat.update({f"{key}{_SEP}{name}": getattr(value, name).detach().contiguous() for name in names})
        else:
            flat[key] = value.detach().contiguous()
    return flat


def unflatten_state(template: dict[str, torch.Tensor], flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def graph_state(program: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
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


def set_graph_state(program: nn.Module, tensors: dict[str, torch.Tensor], literals: list, where: str) -> None:
    """Put a `graph_state` back into a program built the same way; `where`: the file it was read from."""
    nodes = [node for node in program.graph.nodes if node.op == "call_function"]
    if [str(n.target) for n in nodes] != [target for target, _ in literals]:
        raise ValueError(f"{where}: the quantized graph differs from the one this torch/torchao builds; "
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


# ---------------------------------------------------------------------------------------------
# The accuracy gate (`quantize.max_drop`): pure functions of the test metrics.


def quality_drop(source: dict, quantized: dict) -> float:
    """What quantization cost, as `quantize.max_drop` counts it: accuracy points lost (a fraction),
    or for a language model the relative rise in perplexity."""
    if "perplexity" in source:
        return quantized["perplexity"] / source["perplexity"] - 1
    return source["accuracy"] - quantized["accuracy"]


def gate(source: dict, quantized: dict, max_drop: float) -> tuple[str, float]:
    """The verdict on one quantized model: ("accepted" or "rejected", its drop rounded as recorded).
    A drop of exactly `max_drop` passes."""
    drop = quality_drop(source, quantized)
    return ("rejected" if drop > max_drop else "accepted"), round(drop, 6)


class QuantizationRejected(RuntimeError):
    """A quantized model lost more than quantize.max_drop; `models` holds every model's verdict
    (the run keeps them, marked, in its summary)."""

    def __init__(self, message: str, models: dict[str, dict]):
        super().__init__(message)
        self.models = models


def rejection(source_name: str, source: dict, models: dict[str, dict], max_drop: float) -> QuantizationRejected | None:
    """The error failing the quantize stage when a model of `models` (name -> its gated record:
    status, drop and test metrics) was rejected, naming each with its numbers; None when none was."""
    rejected = [name for name, model in models.items() if model["status"] == "rejected"]
    if not rejected:
        return None
    quality = "perplexity" if "perplexity" in source else "accuracy"

    def words(drop: float) -> str:
        return f"{drop * 100:+.1f}% perplexity" if quality == "perplexity" else f"-{drop * 100:.1f} points"

    worst = ", ".join(f"{name} {models[name][quality]:.4f} ({words(models[name]['drop'])})" for name in rejected)
    return QuantizationRejected(
        f"quantize.max_drop: {worst} against the fp32 {source_name}'s test {quality} {source[quality]:.4f}, over the "
        f"allowed {max_drop:g}; kept in models/ and marked rejected in summary.json. Raise quantize.max_drop, "
        f"calibrate on more rows (quantize.calibration_rows) or choose another method", models)
