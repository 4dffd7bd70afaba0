"""How long a checkpoint holds training up, its upload synchronous against asynchronous, to an S3
bucket served on loopback by moto's S3 server (the real S3 protocol through pyarrow, as the tests use).

A digits MLP of `--width` x `--depth` (2.2M parameters at 1024 x 3: about 60 MB a checkpoint: the
consolidated model, DeepSpeed's weights and its ZeRO-2 optimizer shards) on 2 CPU workers, a
checkpoint every `--every` steps. Each checkpoint's stall is what the loop measures and reports with
the next one (`checkpoint_stall_s`: gathering the weights, writing the files, and for a synchronous
upload the upload): the median over a run's checkpoints, runs interleaved sync/async over `--rounds`.
Target: async stalls at least 3x less.

    python bench/checkpoint_upload.py [--rounds 2] [--width 1024] [--depth 3] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_s3() -> tuple[subprocess.Popen, dict]:
    from cluster.session import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.create_dir("bench")
            return server, env
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()

    server, env = start_s3()
    os.environ.update(env)  # before Ray starts: its workers inherit it
    work = Path(tempfile.mkdtemp(prefix="raylaunch-bench-upload-"))
    try:
        import ray

        from dataprep.cache import prepare
        from runconfig.resolved import ResolvedConfig
        from runconfig.schema import RunConfig
        from trainers.fit import build_trainer, load_splits
        from trainers.worker import worker_config

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
        run = RunConfig.model_validate({
            "data": {"source": "sklearn:digits", "transforms": [{"type": "standardize", "per": "feature"}]},
            "model": {"type": "mlp", "width": args.width, "depth": args.depth},
            "train": {"workers": 2, "epochs": 2, "micro_batch_size": 32, "zero": {"stage": 2},
                      "checkpoint_every": args.every, "keep_checkpoints": 100},
        })
        meta, data_dir, _ = prepare(run.model_dump(mode="json")["data"], 128, work / "cache")
        config = worker_config(ResolvedConfig.of(run), meta)
        splits = load_splits(data_dir, in_memory=True)
        stalls: dict[str, list[float]] = {"sync": [], "async": []}
        size_mb = None
        for round_ in range(args.rounds):
            for mode in ("sync", "async") if round_ % 2 == 0 else ("async", "sync"):
                name = f"{mode}-{round_}"
                result = build_trainer(config, splits, f"s3://bench/{name}", name=name,
                                       async_upload=mode == "async").fit()
                values = [m["checkpoint_stall_s"] for _, m in result.best_checkpoints if "checkpoint_stall_s" in m]
                stalls[mode].append(statistics.median(values))
                if size_mb is None:
                    checkpoint = result.best_checkpoints[0][0]
                    from pyarrow.fs import FileSelector

                    infos = checkpoint.filesystem.get_file_info(FileSelector(checkpoint.path, recursive=True))
                    size_mb = sum(i.size or 0 for i in infos) / 2**20
                print(f"round {round_} {mode:5s}: median stall {stalls[mode][-1]:.3f} s over {len(values)} checkpoints",
                      flush=True)
        sync, asynchronous = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
        print(json.dumps({"checkpoint_mb": round(size_mb, 1), "sync_stall_s": round(sync, 3),
                          "async_stall_s": round(asynchronous, 3), "ratio": round(sync / asynchronous, 2),
                          "rounds": {k: [round(v, 3) for v in vs] for k, vs in stalls.items()}}))
    finally:
        import ray

        ray.shutdown()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
