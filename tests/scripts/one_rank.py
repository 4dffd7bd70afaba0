"""Real DeepSpeed engines over gloo with one rank, run as their own process (torch.distributed's process
group is global to a process) by tests/test_lone_rank.py and tests/test_deepspeed_json.py. Each engine
trains the same 3-layer model from the same initial weights on the same random micro batches.

    python tests/scripts/one_rank.py PORT RUNS_JSON

RUNS_JSON maps a name to {"config": a DeepSpeed JSON, "micro_batches": N, "skip_lone_allreduce": bool,
"save": DIR, "adopt": DIR}: with "save" the engine saves a checkpoint there after training; with "adopt"
it first loads the one there and takes its own optimizer values back, as a PBT trial does
(trainers.loop._apply_optimizer_values). Prints one JSON line: for each name, the optimizer torch built
(its class and `fused` default), whether the engine still all-reduces gradients after backward, the
clipping its DeepSpeed optimizer holds (null without one: fp32 without ZeRO), the last step's global
gradient norm (null where none was computed), whether every weight tensor moved, and the final weights
(floats survive JSON exactly, so they can be compared bit for bit).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

from trainers import import_deepspeed  # noqa: E402
from trainers.loop import _apply_optimizer_values, skip_lone_allreduce  # noqa: E402

deepspeed = import_deepspeed()


def train(config: dict, micro_batches: int, skip: bool = False, save: str | None = None,
          adopt: str | None = None) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    initial = [p.detach().clone() for p in model.parameters()]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if skip:
        skip_lone_allreduce(engine)
    if adopt:
        engine.load_checkpoint(adopt, tag="t")
        _apply_optimizer_values(engine, config)
    micro = config["train_micro_batch_size_per_gpu"]
    data = torch.Generator().manual_seed(1)
    for _ in range(micro_batches):
        x, y = torch.randn(micro, 8, generator=data), torch.randint(0, 3, (micro,), generator=data)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    if save:
        engine.save_checkpoint(save, tag="t")
    final = [p.detach().clone() for p in engine.module.parameters()]
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's optimizer
    return {"optimizer": type(optimizer).__name__, "fused": optimizer.defaults.get("fused"),
            "allreduce": engine.enable_backward_allreduce, "clip": getattr(engine.optimizer, "clip_grad", None),
            "grad_norm": None if (norm := engine.get_global_grad_norm()) is None else float(norm),
            "moved": not any(torch.equal(a, b) for a, b in zip(initial, final)),
            "weights": torch.cat([p.flatten() for p in final]).tolist()}


if __name__ == "__main__":
    runs = json.loads(sys.argv[2])
    print(json.dumps({name: train(run["config"], run["micro_batches"], run.get("skip_lone_allreduce", False),
                                  run.get("save"), run.get("adopt"))
                      for name, run in runs.items()}))
