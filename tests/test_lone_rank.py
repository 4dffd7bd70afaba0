"""One rank without ZeRO skips DeepSpeed's gradient all-reduce (trainers.loop.skip_lone_allreduce) and
trains to the same weights, bit for bit, as with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster.session import free_port

# Real DeepSpeed engines over gloo with one rank, in a process of their own (torch.distributed's
# process group is global to a process).
CODE = """
import json, os, sys
import torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
from trainers import import_deepspeed
deepspeed = import_deepspeed()
from trainers.loop import skip_lone_allreduce

def train(stage, skip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              # torch's AdamW, as raylaunch's CPU workers use (trainers.deepspeed_config): DeepSpeed's own
              # would JIT-compile its fused Adam op on a machine's first run, about 40 s.
              "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}}
    initial = [p.detach().clone() for p in model.parameters()]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if skip:
        skip_lone_allreduce(engine)
    data = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(4, 8, generator=data), torch.randint(0, 3, (4,), generator=data)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    final = [p.detach().clone() for p in engine.module.parameters()]
    return initial, final, engine.enable_backward_allreduce

initial, reduced, kept = train(0, skip=False)
_, skipped, flag = train(0, skip=True)
_, _, zero1_flag = train(1, skip=True)
print(json.dumps({"kept": kept, "skipped": not flag, "zero1_kept": zero1_flag,
                  "moved": not any(torch.equal(a, b) for a, b in zip(initial, reduced)),
                  "identical": all(torch.equal(a, b) for a, b in zip(reduced, skipped))}))
"""


def test_one_rank_without_zero_skips_the_all_reduce_and_trains_the_same_weights():
    done = subprocess.run([sys.executable, "-c", CODE, str(free_port())], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["kept"] and result["skipped"]  # DeepSpeed's default, then the skip
    assert result["moved"] and result["identical"]
    assert result["zero1_kept"]  # ZeRO reduces through its optimizer: left alone
