"""Ray Data preprocessing against a single-process pandas/pyarrow implementation, measured in one run.

Two cases, each with the same input, the same transforms and the same output (checked):
  text    ~200 MB of real text (copies of this Python's standard library sources), byte-tokenized
          and packed into blocks of 257 tokens, split train/val/test, written as Parquet;
  images  ~20k small PNGs in class folders, decoded, split, per-channel statistics fitted on the
          train split, written as Parquet (uint8 pixels); then one epoch of augmentations (crop,
          flip, brightness) and the normalization, as a training worker applies them to batches.
Each implementation runs in its own fresh process, so its peak memory (the driver's, for Ray) is
its own. Ray Data runs on an embedded local Ray with every CPU; its start-up is reported apart.

    python bench/data_ingest.py [--text-mb 200] [--images 20000] [--workdir /tmp/raylaunch-bench]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ_LEN = 256
AUGMENT = [{"type": "random_crop", "size": [28, 28], "padding": 2}, {"type": "flip", "horizontal": True, "vertical": False},
           {"type": "brightness", "max_delta": 0.3}]


def text_data(source: Path) -> dict:
    from runconfig.schema import DataConfig

    return DataConfig.model_validate({"source": str(source), "format": "text", "text_glob": "**/*.py",
                                      "transforms": ["tokenize", "pack"]}).model_dump(mode="json")


def image_data(source: Path) -> dict:
    from runconfig.schema import DataConfig

    return DataConfig.model_validate({"source": str(source), "format": "images",
                                      "transforms": [{"type": "standardize", "per": "channel"}, *AUGMENT]}).model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Inputs (not timed)


def make_text(target: Path, megabytes: int) -> None:
    if target.exists():
        return
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    total, copy = 0, 0
    while total < megabytes * 2**20:
        for path in files:
            out = target / f"copy{copy}" / path.relative_to(stdlib)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            total += out.stat().st_size
            if total >= megabytes * 2**20:
                break
        copy += 1


def make_images(target: Path, count: int) -> None:
    import numpy as np
    import sklearn.datasets
    from PIL import Image

    if target.exists():
        return
    digits = sklearn.datasets.load_digits()
    rng = np.random.default_rng(0)
    for i in range(count):
        k = i % len(digits.images)
        grey = Image.fromarray((digits.images[k] * 15).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = (np.asarray(grey, dtype=np.float32)[:, :, None] * tint).clip(0, 255).astype(np.uint8)
        folder = target / str(digits.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, mode="RGB").save(folder / f"{i}.png")


# ---------------------------------------------------------------------------------------------
# The two implementations, each run in a child process: `python data_ingest.py --child ray|single CASE ...`


def child_ray(case: str, source: Path, out: Path) -> dict:
    import ray

    from dataprep.cache import prepare
    from dataprep.stream import stream_split

    importlib.import_module("trainers.batches")  # torch: a training worker has it loaded before its first batch

    started = time.perf_counter()
    ray.init(log_to_driver=False, logging_level="ERROR", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Start-up, reported apart from the rows/s: a worker process per CPU (a long-lived cluster has
    # them; a fresh one starts them on first use, about 1.5 s each here) and Ray Data's own actors,
    # started by its first execution (about 1.4 s, then 0.1 s per execution).
    cpus = int(ray.cluster_resources()["CPU"])
    ray.get([ray.remote(_pause).remote(1.0) for _ in range(cpus)])
    ray.data.range(1).map_batches(lambda batch: batch).materialize()
    startup = time.perf_counter() - started
    started = time.perf_counter()
    data = text_data(source) if case == "text" else image_data(source)
    meta, entry, _ = prepare(data, SEQ_LEN, out)
    seconds = time.perf_counter() - started
    result = {"startup_s": startup, "preprocess_s": seconds, "rows": meta["rows"], "checksum": checksum(entry),
              "normalize": _rounded(meta.get("normalize"))}
    if case == "images":
        started = time.perf_counter()
        total = 0.0
        # As a training worker does: stream the cached split, augment each batch as it arrives.
        for batch in stream_split(entry, "train").iter_batches(batch_size=512, batch_format="numpy"):
            total += float(_augment_batch(batch, meta, 0)["sum"].sum())
        result.update(augment_s=time.perf_counter() - started, augment_checksum=total)
    ray.shutdown()
    return result


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _augment_batch(batch: dict, meta: dict, epoch: int) -> dict:
    """What a training worker does to a batch: pixels to [0, 1], augment, normalize."""
    import numpy as np
    import torch

    from trainers.batches import model_batch

    x, _ = model_batch({"features": torch.as_tensor(np.stack(batch["features"])), "label": None,
                        "key": torch.as_tensor(np.asarray(batch["key"]))}, meta, epoch)
    return {"sum": x.double().sum(dim=(1, 2, 3)).numpy()}


def child_single(case: str, source: Path, out: Path) -> dict:
    """The same work in one process: pandas/pyarrow/numpy, and the same per-batch functions."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray.data.extensions import ArrowTensorArray

    from dataprep.sources import data_files
    from dataprep.stream import encode_tensors
    from dataprep.text import PIECE_BLOCKS, _pack, _pieces
    importlib.import_module("trainers.batches")  # torch, as on the Ray side

    started = time.perf_counter()
    entry = out / "single"
    if case == "text":
        data = text_data(source)
        files = data_files(data)
        parts = []
        for start in range(0, len(files.paths), 16):  # 16 files per call, as each Ray Data task takes them
            paths = files.paths[start:start + 16]
            contents = []
            for path in paths:
                with open(path, "rb") as f:
                    contents.append(f.read())
            pieces = _pieces({"bytes": contents, "path": paths}, files.relative, PIECE_BLOCKS * (SEQ_LEN + 1),
                             data["seed"], data["val_fraction"], data["test_fraction"])
            parts.append(_pack(pieces, SEQ_LEN, None))
        tokens = np.concatenate([p["tokens"] for p in parts])
        keys = np.concatenate([p["key"] for p in parts])
        splits = np.concatenate([p["split"] for p in parts])
        rows = {}
        for number, name in enumerate(("train", "val", "test")):
            keep = splits == number
            (entry / name).mkdir(parents=True, exist_ok=True)
            table = pa.table({"tokens": ArrowTensorArray.from_numpy(tokens[keep]), "key": keys[keep]})
            pq.write_table(encode_tensors(table), entry / name / "part.parquet")
            rows[name] = int(keep.sum())
        return {"preprocess_s": time.perf_counter() - started, "rows": rows, "checksum": checksum(entry)}

    from PIL import Image

    from dataprep.preprocess import _encode_images, class_folders, pixel_stats
    from dataprep.transforms import shift_and_scale

    data = image_data(source)
    files = data_files(data)
    images = []
    for path in files.paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
    shape = list(images[0].shape)
    classes = class_folders(files)
    encoded = _encode_images({"image": images, "__file": np.array(files.paths)}, shape, files.relative,
                             {c: i for i, c in enumerate(classes)}, data["seed"], data["val_fraction"], data["test_fraction"],
                             None, lambda entries: None)
    train = encoded["features"][encoded["split"] == 0]
    shift, scale = shift_and_scale(pixel_stats(_channel_stats(train)), "standardize", "channel", shape)
    rows = {}
    for number, name in enumerate(("train", "val", "test")):
        keep = encoded["split"] == number
        (entry / name).mkdir(parents=True, exist_ok=True)
        table = pa.table({"features": ArrowTensorArray.from_numpy(encoded["features"][keep]),
                          "label": encoded["label"][keep], "key": encoded["key"][keep]})
        pq.write_table(encode_tensors(table), entry / name / "part.parquet")
        rows[name] = int(keep.sum())
    meta = {"normalize": {"method": "standardize", "per": "channel", "shift": shift.tolist(), "scale": scale.tolist(),
                          "train_rows": rows["train"]}, "augment": AUGMENT, "seed": data["seed"]}
    result = {"preprocess_s": time.perf_counter() - started, "rows": rows, "checksum": checksum(entry),
              "normalize": _rounded(meta["normalize"])}
    started = time.perf_counter()
    keep = encoded["split"] == 0
    pixels, keys = encoded["features"][keep], encoded["key"][keep]
    total = 0.0
    for start in range(0, len(keys), 512):
        total += float(_augment_batch({"features": pixels[start:start + 512], "key": keys[start:start + 512]}, meta, 0)["sum"].sum())
    result.update(augment_s=time.perf_counter() - started, augment_checksum=total)
    return result


def _rounded(normalize: dict | None) -> dict | None:
    """The fitted normalization, to compare the two implementations' (float sums differ in the last bits)."""
    import numpy as np

    if normalize is None:
        return None
    return {**normalize, "shift": np.round(normalize["shift"], 5).tolist(), "scale": np.round(normalize["scale"], 5).tolist()}


def _channel_stats(x):
    import numpy as np

    flat = x.astype(np.float64).swapaxes(0, 1).reshape(x.shape[1], -1).T
    return [len(flat), flat.sum(0), (flat * flat).sum(0), flat.min(0), flat.max(0)]


def checksum(entry: Path) -> dict:
    """Rows and a sum over every split's values: two implementations agree when these do."""
    import numpy as np
    import pyarrow.parquet as pq

    from dataprep.stream import decode_tensors

    sums = {}
    for name in ("train", "val", "test"):
        total, rows = 0.0, 0
        for path in sorted((entry / name).rglob("*.parquet")):
            table = decode_tensors(pq.read_table(path))
            column = table["tokens" if "tokens" in table.column_names else "features"].combine_chunks()
            total += float(column.to_numpy().astype(np.float64).sum())
            rows += table.num_rows
        sums[name] = [rows, round(total, 1)]
    return sums


# ---------------------------------------------------------------------------------------------


def run_child(kind: str, case: str, source: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, case, str(source), str(out)],
                          capture_output=True, text=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-mb", type=int, default=200)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/raylaunch-bench"))
    parser.add_argument("--cases", default="text,images", help="which cases to run (comma-separated)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, case, source, out = args.child
        result = (child_ray if kind == "ray" else child_single)(case, Path(source), Path(out))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    text_dir, image_dir = args.workdir / f"text-{args.text_mb}mb", args.workdir / f"images-{args.images}"
    print(f"inputs: {args.text_mb} MB of text under {text_dir}, {args.images:,} images under {image_dir}")
    if "text" in args.cases:
        make_text(text_dir, args.text_mb)
    if "images" in args.cases:
        make_images(image_dir, args.images)
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    for case, source in (("text", text_dir), ("images", image_dir)):
        if case not in args.cases.split(","):
            continue
        single = run_child("single", case, source, args.workdir / "out-single")
        ray_result = run_child("ray", case, source, args.workdir / "out-ray")
        same = single["checksum"] == ray_result["checksum"] and single.get("normalize") == ray_result.get("normalize")
        rows = sum(single["rows"].values())
        s_rate, r_rate = rows / single["preprocess_s"], rows / ray_result["preprocess_s"]
        print(f"\n{case}: {rows:,} output rows; outputs {'identical' if same else 'DIFFER'} "
              f"({single['checksum']} vs {ray_result['checksum']})" if not same else
              f"\n{case}: {rows:,} output rows; outputs identical (rows and value sums per split)")
        label = "decode, fit, write" if case == "images" else "tokenize, pack, write"
        print(f"  {label}: single process {single['preprocess_s']:5.1f} s ({s_rate:,.0f} rows/s, peak RSS "
              f"{single['peak_rss_mb']:,.0f} MB); Ray Data {ray_result['preprocess_s']:5.1f} s ({r_rate:,.0f} rows/s, peak driver RSS "
              f"{ray_result['peak_rss_mb']:,.0f} MB; +{ray_result['startup_s']:.1f} s Ray and Ray Data start-up)")
        print(f"  ratio Ray Data / single process: {r_rate / s_rate:.2f}x")
        if case == "images":
            train = single["rows"]["train"]
            a_single, a_ray = train / single["augment_s"], train / ray_result["augment_s"]
            agree = abs(single["augment_checksum"] - ray_result["augment_checksum"]) <= 1e-6 * abs(single["augment_checksum"]) + 1e-3
            print(f"  one augmented epoch of the train split ({'same draws' if agree else 'DIFFERENT draws'}): single process "
                  f"{single['augment_s']:.2f} s from its arrays in memory ({a_single:,.0f} rows/s); Ray Data {ray_result['augment_s']:.2f} s "
                  f"streamed from the cache ({a_ray:,.0f} rows/s); ratio {a_ray / a_single:.2f}x")
            both_single = single["preprocess_s"] + single["augment_s"]
            both_ray = ray_result["preprocess_s"] + ray_result["augment_s"]
            print(f"  decoded and augmented, end to end: single process {both_single:.1f} s, Ray Data {both_ray:.1f} s; "
                  f"ratio {both_single / both_ray:.2f}x")

if __name__ == "__main__":
    main()
