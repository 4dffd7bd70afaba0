"""Counting what would stop a GPU in a training step, on any machine.

A host-device sync leaves the GPU idle while the CPU waits: a tensor's value read on the host
(`.item()`, `.tolist()`, `float(t)`, `if t:`), a copy to the host (`.cpu()`, `.numpy()`), a
data-dependent shape (`.nonzero()`), an explicit synchronize. On a CPU none of them waits, so
their cost is invisible there; `SyncAudit` counts the calls instead, by the module and function
that made them, while a step runs on the thread that runs it. `WorkerConfig.sync_audit` turns it on
in the workers (tests/test_sync_free_step.py, bench/gpu_throughput.py); on a GPU the bench also runs
a step under `torch.cuda.set_sync_debug_mode`, which sees the syncs inside C++ too.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

# Tensor methods whose result needs the value on the host (or its shape, for nonzero).
TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")
ROOT = Path(__file__).resolve().parent.parent


def _origin(frame) -> str:
    """`package/module.py:function` of the frame that called a counted function, or the library's
    name for code outside raylaunch (`deepspeed`, `torch`, ...)."""
    path = Path(frame.f_code.co_filename).resolve()
    parts = path.parts
    site = next((i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages")), None)
    if site is not None and site + 1 < len(parts):  # an installed package (a venv may sit in the checkout)
        return f"{parts[site + 1]}:{frame.f_code.co_name}"
    try:
        return f"{path.relative_to(ROOT)}:{frame.f_code.co_name}"
    except ValueError:
        return f"{path.name}:{frame.f_code.co_name}"


class SyncAudit:
    """Counts calls of the functions that would sync a GPU, made on this thread inside `step()`."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.steps = 0
        self.micro_batches = 0
        self._thread = threading.get_ident()
        self._active = False
        self._originals: dict[tuple[object, str], object | None] = {}  # None: inherited, not the owner's own

    def install(self) -> SyncAudit:
        for name in TENSOR_METHODS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        self._wrap(torch, "nonzero", "torch.nonzero")
        if torch.cuda.is_available():
            self._wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
            self._wrap(torch.cuda.Event, "synchronize", "Event.synchronize")
        return self

    def uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._originals.clear()

    def _wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self._originals[(owner, name)] = vars(owner).get(name)
        audit = self

        def counted(*args, **kwargs):
            if audit._active and threading.get_ident() == audit._thread:
                audit.calls[f"{_origin(sys._getframe(1))} {label}"] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    @contextmanager
    def step(self, micro_batches: int):
        """One optimizer step's work, from its first micro batch to its losses queued for reading."""
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self.steps += 1
            self.micro_batches += micro_batches

    def result(self) -> dict:
        return {"steps": self.steps, "micro_batches": self.micro_batches, "calls": dict(self.calls)}

    def write(self, folder: str, rank: int) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), **self.result()}))


class _Off:
    """No audit: `step()` does nothing."""

    @contextmanager
    def step(self, micro_batches: int):
        yield

    def write(self, folder: str, rank: int) -> None:
        pass

    def uninstall(self) -> None:
        pass


def sync_audit(folder: str | None) -> SyncAudit | _Off:
    return SyncAudit().install() if folder else _Off()
