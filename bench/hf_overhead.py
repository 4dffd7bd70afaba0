"""raylaunch's cost on a transformers model, against the pattern Ray documents and a plain loop.

configs/hf-llama.yaml's Llama (4M parameters, fresh weights saved as a transformers folder with the
BPE its data trains), the same packed blocks of its asyncio text, the same DeepSpeed JSON (the one
raylaunch's workers build: ZeRO-2, AdamW, constant lr), the same global batch, these ways:
  1. ray-2w   Ray's documented DeepSpeed pattern (doc/source/train/doc_code/deepspeed_torch_trainer.py):
              a TorchTrainer whose train_func calls `AutoModelForCausalLM.from_pretrained` and
              `deepspeed.initialize(training_data=...)` itself and steps on `outputs.loss`;
              2 workers of 1 CPU, gloo;
  2. rl-2w    raylaunch (`trainers.fit.build_trainer` on the same folder), 2 workers of 1 CPU;
  3. plain    that train_func's model, engine and loop in one process (world 1, 2 threads), no Ray;
  4. rl-1w    raylaunch, 1 worker of 2 CPUs.
Throughput is steady state: tokens/s over every epoch but the first, each epoch's training time
alone (no validation or checkpoints, which only raylaunch takes), the median over rounds that run
the ways interleaved (the order reversed every other round). Start-up is reported apart: the
seconds beyond the training epochs (process and worker start, model load, engine, data, and for
raylaunch its validation and checkpoints). Targets: rl-2w / ray-2w >= 0.97; rl-1w / plain is reported.

    python bench/hf_overhead.py [--rounds 2] [--epochs 3] [--workdir /tmp/raylaunch-bench-hf]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAYS = ["plain", "ray-2w", "rl-1w", "rl-2w"]
TARGETS = {("rl-2w", "ray-2w"): 0.97, ("rl-1w", "plain"): None}
GLOBAL_BATCH = 16


def ray_pattern(config: dict) -> None:
    """Ray's documented DeepSpeed train_func, on this benchmark's folder, rows and JSON. Rank 0 writes
    each epoch's training seconds and tokens to `config["result"]` (Ray Train v2 gives a run whose
    reports carry no checkpoint no metrics in its Result: ../shared/FACTS.md)."""
    import ray.train

    result = train_func(config)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["result"]).write_text(json.dumps(result))


def train_func(config: dict) -> dict:
    """The train_func's work: load the model and rows, build the engine, train; each epoch's
    training seconds and the tokens all ranks trained on in it."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from bench.train_overhead import load_rows
    from trainers import import_deepspeed

    deepspeed = import_deepspeed()
    torch.manual_seed(0)
    tokens = load_rows(config["data_dir"], config["meta"])["tokens"].long()
    model = AutoModelForCausalLM.from_pretrained(config["model_dir"], use_kernels=False, dtype=torch.float32)
    engine, _, loader, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                training_data=torch.utils.data.TensorDataset(tokens[:, :-1]),
                                                config=config["deepspeed"])
    seconds, counted = [], []
    for _ in range(config["epochs"]):
        engine.train()
        started, count = time.perf_counter(), 0
        for (x,) in loader:
            x = x.to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            count += x.numel()
        seconds.append(time.perf_counter() - started)
        counted.append(count * dist.get_world_size())
    return {"epoch_seconds": seconds, "tokens": counted}


def plain(spec_path: str) -> None:
    """The same train_func in one process with no Ray (world 1): prints its epochs as one JSON line."""
    import torch
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    print("RESULT " + json.dumps(train_func(spec)), flush=True)


def _steady(seconds: list[float], tokens: list[int]) -> float:
    rates = [t / s for t, s in zip(tokens, seconds)]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/raylaunch-bench-hf")
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        return plain(args.plain)
    work = Path(args.workdir)
    shutil.rmtree(work / "ray", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    import ray
    import torch
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoConfig, AutoModelForCausalLM

    from cluster.session import free_port, quiet_driver_logs, ray_session
    from dataprep.cache import prepare
    from dataprep.text import HfTokenizer
    from launcher.config import load
    from runconfig.resolved import ResolvedConfig
    from bench.train_overhead import print_medians
    from trainers.fit import build_trainer, load_splits
    from trainers.worker import worker_config

    quiet_driver_logs(False)
    cfg = load(ROOT / "configs" / "hf-llama.yaml", ["train.lr_schedule=constant", "train.grad_accum_steps=1",
                                                     "train.warmup_steps=0", "train.grad_clip=0.0"])
    run = cfg.model_dump(mode="json")
    embedded = contextlib.ExitStack()
    embedded.enter_context(ray_session(None, 2, verbose=False))
    meta, data_dir, _ = prepare(run["data"], cfg.model.seq_len, work / "cache", hf=HfTokenizer(None))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():  # the config's Llama with fresh weights, as a transformers folder
        values = dict(run["model"]["hf_config"])
        config = AutoConfig.for_model(values.pop("model_type"), vocab_size=meta["vocab_size"], **values)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        shutil.copytree(data_dir / "tokenizer", model_dir, dirs_exist_ok=True)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())

    def resolved(workers: int) -> ResolvedConfig:
        doc = json.loads(json.dumps(run))
        doc["model"] = {"type": "hf", "name_or_path": str(model_dir), "seq_len": cfg.model.seq_len}
        doc["train"] |= {"workers": workers, "cpus_per_worker": 2 // workers, "micro_batch_size": GLOBAL_BATCH // workers,
                         "epochs": args.epochs, "keep_checkpoints": args.epochs, "checkpoint_every": None}
        return ResolvedConfig.of(cfg.model_validate(doc))

    def rl(workers: int, name: str) -> dict:
        config = worker_config(resolved(workers), meta)
        started = time.perf_counter()
        result = build_trainer(config, load_splits(data_dir), work / "ray", name=name).fit()
        wall = time.perf_counter() - started
        rates = list(result.metrics_dataframe["tokens_per_s"])
        rate = statistics.median(rates[1:] or rates)
        tokens = config.steps_per_epoch * GLOBAL_BATCH * cfg.model.seq_len
        return {"rate": rate, "startup_s": wall - args.epochs * tokens / rate, "wall_s": wall}

    def pattern(workers: int, name: str) -> dict:
        spec = {"data_dir": str(data_dir), "meta": meta, "model_dir": str(model_dir), "epochs": args.epochs,
                "deepspeed": worker_config(resolved(workers), meta).deepspeed}
        started = time.perf_counter()
        if workers == 1:
            path = work / "plain.json"
            path.write_text(json.dumps(spec | {"port": free_port()}))
            done = subprocess.run([sys.executable, __file__, "--plain", str(path)], capture_output=True, text=True,
                                  env=os.environ | {"OMP_NUM_THREADS": "2"}, timeout=3600)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"the plain loop failed:\n{done.stderr[-3000:]}")
            out = json.loads(line.removeprefix("RESULT "))
        else:
            spec["result"] = str(work / f"{name}.json")
            trainer = TorchTrainer(ray_pattern, train_loop_config=spec, torch_config=TorchConfig(backend="gloo"),
                                   scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                                   run_config=RayRunConfig(name=name, storage_path=str(work / "ray")))
            trainer.fit()
            out = json.loads(Path(spec["result"]).read_text())
        wall = time.perf_counter() - started
        rate = _steady(out["epoch_seconds"], out["tokens"])
        return {"rate": rate, "startup_s": wall - sum(out["epoch_seconds"]), "wall_s": wall}

    print(f"machine: {os.cpu_count()} CPUs; model: {params:,} parameters, seq_len {cfg.model.seq_len}, global batch "
          f"{GLOBAL_BATCH}, {meta['rows']['train']} train blocks, {args.epochs} epochs")
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    try:
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                workers = 1 if way in ("plain", "rl-1w") else 2
                out = rl(workers, f"{way}-{r}") if way.startswith("rl") else pattern(workers, f"{way}-{r}")
                runs[way].append(out)
                print(f"  round {r + 1} {way:<7} {out['rate']:>9,.0f} tokens/s  start-up {out['startup_s']:5.1f} s"
                      f"  wall {out['wall_s']:5.1f} s", flush=True)
    finally:
        embedded.close()
        ray.shutdown()
    print(f"\nmedian of {args.rounds} interleaved rounds (tokens/s, steady state)")
    medians = print_medians(runs, TARGETS)
    (work / "results.json").write_text(json.dumps({"medians": medians, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
