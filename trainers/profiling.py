"""One training step under torch.profiler, summarized: where a step's time goes (the operators with
the most self time on the device, or on the CPU without one) and how much of the step the device
sat idle between kernels. `WorkerConfig.profile_step` turns it on for rank 0; the summary goes
with the next report (`profile`), and bench/gpu_throughput.py prints it."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 12


def busy_and_gaps(intervals: list[tuple[float, float]], largest: int = 5) -> dict:
    """Of kernel [start, end) intervals in microseconds (overlapping ones on several streams count
    once): the span from the first start to the last end, the busy time, the idle time between
    them, and the largest idle gaps, all in milliseconds."""
    if not intervals:
        return {"kernels": 0}
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = sorted((b[0] - a[1] for a, b in zip(merged, merged[1:])), reverse=True)
    span = merged[-1][1] - merged[0][0]
    busy = sum(end - start for start, end in merged)
    return {"kernels": len(intervals), "span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
            "idle_ms": round((span - busy) / 1e3, 3), "busy_fraction": round(busy / span, 4) if span else 1.0,
            "gaps_over_100us": sum(g > 100 for g in gaps), "largest_gaps_ms": [round(g / 1e3, 3) for g in gaps[:largest]]}


def summarize(prof, on_device: bool, wall_s: float) -> dict:
    """The profiled step: its wall time, the top operators by self time (device time on a GPU,
    CPU time otherwise: name, calls, self device ms, self CPU ms), and the device's busy time and gaps."""
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    top = [[e.key, e.count, round(e.self_device_time_total / 1e3, 3), round(e.self_cpu_time_total / 1e3, 3)]
           for e in averages[:TOP_OPS]]
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return {"wall_ms": round(wall_s * 1e3, 3), "sorted_by": key, "top_ops": top, "device": busy_and_gaps(kernels)}


@contextmanager
def profiled_step(device: torch.device, into: dict):
    """Profile what runs inside; `into` receives the summary. On a GPU the step also runs under
    torch's sync debug mode, and the syncs it warns of are counted (`syncs`, with where the first
    few came from); the device is synchronized before the profiler stops, so every kernel of the
    step is in the trace."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize(device)
    into.update(summarize(prof, cuda, time.perf_counter() - started))
    if cuda:
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        into["syncs"] = len(syncs)
        into["sync_sites"] = [f"{w.filename}:{w.lineno}" for w in syncs[:8]]
