"""One rank without ZeRO skips DeepSpeed's gradient all-reduce (trainers.loop.skip_lone_allreduce) and
trains to the same weights, bit for bit, as with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster.session import free_port

ONE_RANK = Path(__file__).parent / "scripts" / "one_rank.py"  # real DeepSpeed engines over gloo, one rank


def test_one_rank_without_zero_skips_the_all_reduce_and_trains_the_same_weights():
    def config(stage: int) -> dict:
        return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                # torch's AdamW, as raylaunch's CPU workers use (trainers.deepspeed_config): DeepSpeed's own
                # would JIT-compile its fused Adam op on a machine's first run, about 40 s.
                "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                "zero_optimization": {"stage": stage}}

    runs = {"reduced": {"config": config(0), "micro_batches": 12},
            "skipped": {"config": config(0), "micro_batches": 12, "skip_lone_allreduce": True},
            "zero1": {"config": config(1), "micro_batches": 12, "skip_lone_allreduce": True}}
    done = subprocess.run([sys.executable, str(ONE_RANK), str(free_port()), json.dumps(runs)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["reduced"]["allreduce"] and not out["skipped"]["allreduce"]  # DeepSpeed's default, then the skip
    assert out["reduced"]["moved"] and out["skipped"]["weights"] == out["reduced"]["weights"]
    assert out["zero1"]["allreduce"]  # ZeRO reduces through its optimizer: left alone
