"""Your own model: a builder (and optionally a loss) named by import path, `package.module:function`.

The builder gets the model section (its own settings under `options`), the input shape and the
number of classes (or the vocabulary size) and returns an `nn.Module` whose forward maps a batch of
inputs to logits. The module is imported from the working directory: the driver's (the CLI puts
it on the path), which Ray puts on its workers' path, and which `raylaunch submit` uploads.
"""

from __future__ import annotations

import importlib
import os
import sys

from torch import nn

from runconfig.problems import BadInput


class UserCodeError(BadInput):
    """A builder or loss that does not import, or a builder that returns no module."""


def import_path(path: str, field: str):
    """The function at `package.module:function` (`field` names the config field for the message)."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)  # the `raylaunch` script's path holds its own folder, not the working directory
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error its import raises is theirs to see
        raise UserCodeError(f"model.{field}: {path!r} does not import ({type(exc).__name__}: {exc}); make "
                            f"{module_name} importable from the working directory ({here})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserCodeError(f"model.{field}: {module_name} has no function {name!r}")
    return function


def build_python(model: dict, input_shape: list[int], num_classes: int) -> nn.Module:
    builder = model["builder"]
    built = import_path(builder, "builder")(model, list(input_shape), num_classes)
    if not isinstance(built, nn.Module):
        raise UserCodeError(f"model.builder: {builder} returned {type(built).__name__}, not a torch.nn.Module")
    return built
