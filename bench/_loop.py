"""The baselines of bench/train_overhead.py and bench/gpu_throughput.py: a plain PyTorch training
loop over data in memory, single-process, or under `torchrun` as DistributedDataParallel over gloo
(each rank an equal share of the rows, the global batch split across ranks). Prints one JSON line
from rank 0: the seconds of every epoch, the samples trained per epoch, the seconds to the first
step, and on a GPU the peak memory its tensors took; with spec "steady_from" (a step), also the
items and seconds from that step of the last epoch to its end, timed between two device syncs.

With spec "deepspeed" (a DeepSpeed JSON), the model trains on the DeepSpeed engine that JSON
describes instead of DDP and torch's AdamW: the engine raylaunch's workers build, without Ray.

torch's AdamW runs its default kernel on a CPU, or the fused one with spec "fused": true (raylaunch's
CPU workers use the fused one). On a GPU (spec "device": "cuda") the rows sit in GPU memory, the
model trains under `torch.autocast(bfloat16)` over fp32 weights with torch's fused AdamW (spec
"precision": "bf16"), and each epoch's time ends at a device synchronize.

    python bench/_loop.py SPEC.json          (SPEC: written by train_overhead.py)
    torchrun --nproc_per_node 2 bench/_loop.py SPEC.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(spec_path: str) -> None:
    result = train(json.loads(Path(spec_path).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)


def train(spec: dict, after_epoch=None) -> dict:
    """Train as `spec` says; this rank's result (what main prints from rank 0). `after_epoch(model,
    epoch)`, where given, runs after each timed epoch (bench/overhead_parts.py: a Ray Train report)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from bench.train_overhead import load_rows
    from trainers.batches import model_batch
    from trainers.models import build_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    meta = spec["meta"]
    rows = load_rows(spec["data_dir"], meta)
    per_rank = len(next(iter(rows.values()))) // world
    rows = {k: v[rank * per_rank:(rank + 1) * per_rank].to(device) for k, v in rows.items()}  # equal contiguous shards
    batch = spec["global_batch"] // world
    torch.manual_seed(0)
    model = build_model(spec["model"], meta["input_shape"], meta["num_classes"]).to(device)
    train = spec["train"]
    if spec.get("deepspeed"):  # the engine raylaunch's workers build, without Ray
        from trainers import import_deepspeed
        from trainers.loop import skip_lone_allreduce

        engine, *_ = import_deepspeed().initialize(model=model, model_parameters=model.parameters(),
                                                   config=spec["deepspeed"])
        skip_lone_allreduce(engine)  # as raylaunch's workers do (a no-op for more than one rank)
        model, optimizer = engine, None
    else:
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"],
                                      betas=tuple(train["adam_betas"]), eps=1e-8, fused=cuda or spec.get("fused") or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("precision") == "bf16")
    steps = per_rank // batch
    epochs, first_step = [], None
    for epoch in range(spec["epochs"]):
        order = torch.randperm(per_rank, generator=torch.Generator().manual_seed(epoch)).to(device)
        sync()
        started = time.perf_counter()
        model.train()
        for step in range(steps):
            if step == spec.get("steady_from") and epoch == spec["epochs"] - 1:
                sync()  # the steady state: from here to the last epoch's end
                steady_started = time.perf_counter()
            index = order[step * batch:(step + 1) * batch]
            x, y = model_batch({k: v[index] for k, v in rows.items()}, meta, epoch)
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
            if optimizer is None:  # DeepSpeed: clipping and zeroing are the engine's
                model.backward(loss)
                model.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
                optimizer.step()
            if first_step is None:
                sync()
                first_step = time.perf_counter() - STARTED
        sync()
        epochs.append(time.perf_counter() - started)
        if after_epoch is not None:
            after_epoch(model, epoch)
    if world > 1:
        dist.destroy_process_group()
    result = {"epoch_seconds": epochs, "items_per_epoch": steps * spec["global_batch"] * spec["items_per_row"],
            "first_step_s": first_step,
            "gpu_memory_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}
    if spec.get("steady_from") is not None:
        steady = steps - spec["steady_from"]
        result |= {"items_steady": steady * spec["global_batch"] * spec["items_per_row"],
                   "seconds_steady": epochs[-1] - (steady_started - started)}
    return result


def run(spec: Path, world: int, threads: int) -> tuple[dict, float]:
    """Run this loop on SPEC in a fresh process (`torchrun` for world > 1) with `threads` torch
    threads a rank: rank 0's RESULT, and the process's wall seconds."""
    if world == 1:
        command = [sys.executable, str(ROOT / "bench" / "_loop.py"), str(spec)]
    else:
        from cluster.session import free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                   str(free_port()), str(ROOT / "bench" / "_loop.py"), str(spec)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env=os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": path})
    wall = time.perf_counter() - started
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"the plain loop failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT ")), wall


if __name__ == "__main__":
    main(sys.argv[1])
