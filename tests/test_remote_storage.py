"""`output.dir` at a URI: an S3 bucket served on loopback by moto's S3 server (no network, real
S3 protocol through pyarrow's S3 filesystem, the same code Ray Train and Tune write checkpoints
with). Checkpoints, models, summary and reports land in the bucket; nothing lands in a local
folder named `s3:`; a second run at the same URI is refused; a killed driver's `--resume` continues
from the checkpoints in the bucket.
(The quickstart job in test_pipeline_e2e.py writes to a `file://` URI.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.remote import staging_dir
from cluster.session import free_port

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
URI = "s3://runs/digits"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, with a bucket `runs`; the environment a process
    needs to reach it (pyarrow and the AWS SDK read AWS_ENDPOINT_URL)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                               region="us-east-1", allow_bucket_creation=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                fs.create_dir("runs")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield fs, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _args(cache: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--stages", "preprocess,train",
            "--set", f"output.dir={URI}", "--set", f"data.cache_dir={cache}", "--set", "train.epochs=2",
            "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=100", "--set", "model.width=8",
            "--set", "cluster.num_cpus=2", *more]


def _run(env: dict, cache: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(cache, *more), cwd=ROOT, env=os.environ | env, capture_output=True, text=True, timeout=600)


def _files(fs, root: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(root + "/") for i in infos if i.type == pafs.FileType.File}


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def test_a_run_at_an_s3_uri_writes_there_and_a_killed_driver_resumes_from_there(s3, quickstart_cache):
    fs, env = s3
    # Its own process (and its own embedded Ray), killed like a driver whose machine went away once
    # Ray Train has put two checkpoints in the bucket.
    driver = subprocess.Popen(_args(quickstart_cache), cwd=ROOT, env=os.environ | env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len([f for f in _files(fs, "runs/digits/ray/train") if f.endswith("/model.safetensors")]) < 2:
        assert driver.poll() is None and time.monotonic() < deadline, "no two checkpoints in the bucket within 300 s"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
    driver.wait()
    assert not (ROOT / "s3:").exists()

    again = _run(env, quickstart_cache)
    assert again.returncode == 2 and f"output.dir: {URI} already exists and is not empty" in again.stderr

    # The resume starts from what the bucket holds: the local staging folder is gone.
    shutil.rmtree(staging_dir(URI))
    done = _run(env, quickstart_cache, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "reused cached" in out and "continuing from the checkpoint at step" in out
    summary = json.loads(_read(fs, "runs/digits/summary.json"))
    assert summary["status"] == "succeeded" and summary["stages"]["train"]["resumed_from_step"] >= 5
    snapshot = json.loads(_read(fs, "runs/digits/ray/train/checkpoint_manager_snapshot.json"))
    steps = [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]  # ordered by score, not time
    assert len(steps) == len(set(steps))  # no step trained twice: it continued, it did not start over
    assert max(steps) == 2 * (summary["stages"]["preprocess"]["rows"]["train"] // 2 // 32)
    # Ray Train wrote every checkpoint (the model and each rank's DeepSpeed state) to the bucket itself;
    # the driver copied up its own files, the kept model byte for byte.
    files = _files(fs, "runs/digits")
    assert {"config.yaml", "summary.json", "report.md", "report.html", "models/teacher/model.json",
            "metrics/teacher.jsonl"} <= files
    checkpoints = {f.split("/")[2] for f in files if f.startswith("ray/train/checkpoint_") and f.count("/") > 2}
    assert len(checkpoints) == len(steps) and all(f"ray/train/{c}/model.safetensors" in files for c in checkpoints)
    assert _read(fs, "runs/digits/models/teacher/model.safetensors") == \
        (staging_dir(URI) / "models" / "teacher" / "model.safetensors").read_bytes()

    bad = _run(env, quickstart_cache, "--set", "output.dir=nosuchscheme://x/y")
    assert bad.returncode == 2 and "output.dir: cannot open nosuchscheme://x/y" in bad.stderr


def test_download_skips_ray_and_fetch_names_a_missing_file(tmp_path):
    from cluster.remote import download, fetch, is_empty_dir, join, read_text, to_uri

    run = tmp_path / "run"
    for name in ("summary.json", "models/teacher/model.json", "ray/train/checkpoint_1/model.safetensors"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    uri = run.as_uri()
    local = tmp_path / "staging"
    download(uri, local)
    found = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert found == ["models/teacher/model.json", "summary.json"]
    assert read_text(join(uri, "summary.json")) == "summary.json" and read_text(join(uri, "nothing")) is None
    assert is_empty_dir((tmp_path / "none").as_uri()) and not is_empty_dir(uri)
    with pytest.raises(FileNotFoundError, match="model.safetensors: no such file"):
        fetch(join(uri, "models", "teacher"), ("model.json", "model.safetensors"), tmp_path / "model")
    assert to_uri(pafs.LocalFileSystem(), "/x/y") == "/x/y"
    assert to_uri(pafs.S3FileSystem(anonymous=True, region="us-east-1"), "bucket/x") == "s3://bucket/x"


@pytest.mark.parametrize("as_uri", [False, True])
def test_remove_dirs_drops_only_unlisted_checkpoint_folders(tmp_path, as_uri):
    from cluster.remote import remove_dirs

    experiment = tmp_path / "train"
    for name in ("checkpoint_a/model.safetensors", "checkpoint_b/model.safetensors", "checkpoint_half/deepspeed/x",
                 "checkpoint_manager_snapshot.json", "other/file"):
        (experiment / name).parent.mkdir(parents=True, exist_ok=True)
        (experiment / name).write_text(name)
    where = experiment.as_uri() if as_uri else experiment
    assert remove_dirs(where, "checkpoint_", keep={"checkpoint_a", "checkpoint_b"}) == ["checkpoint_half"]
    assert sorted(p.name for p in experiment.iterdir()) == ["checkpoint_a", "checkpoint_b",
                                                            "checkpoint_manager_snapshot.json", "other"]
    assert remove_dirs(tmp_path / "missing", "checkpoint_", keep=set()) == []


def test_a_run_that_finds_its_uri_claimed_after_checking_it_empty_is_refused(s3, quickstart_cache):
    """Two runs started at once at the same empty URI both pass the emptiness check; the manifest
    each then writes with a conditional PUT lets only the first through, and the second touches
    neither the URI nor the staging folder the two would share."""
    from launcher.rundir import MANIFEST, claim

    fs, env = s3
    uri = "s3://runs/claimed"
    theirs = staging_dir(uri) / "theirs.txt"  # what the other run has staged so far
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_text("the other run's")
    driver = subprocess.Popen(_args(quickstart_cache, "--set", f"output.dir={uri}"), cwd=ROOT, env=os.environ | env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        header = driver.stdout.readline()  # printed once every check before Ray passed: the URI was empty
        assert header.startswith(f"raylaunch: {QUICKSTART} -> {uri}"), header + driver.stderr.read()
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            assert claim(uri) is None  # the other run claims the URI meanwhile
            out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 2, out + err
    assert err.startswith(f"output.dir: another run claimed {uri} after this one found it empty (run "), err
    assert len(err.splitlines()) == 1 and "choose another output.dir" in err
    assert _files(fs, "runs/claimed") == {MANIFEST}
    assert theirs.read_text() == "the other run's"
    shutil.rmtree(staging_dir(uri))


@pytest.mark.parametrize("where", ["path", "file_uri"])
def test_only_the_first_claim_of_a_run_directory_wins(tmp_path, where):
    from launcher.rundir import MANIFEST, claim, read_manifest, resume_problems

    out = str(tmp_path / "run") if where == "path" else (tmp_path / "run").as_uri()
    assert resume_problems(out)  # nothing there: raylaunch did not start a run in it
    assert claim(out) is None
    first = read_manifest(out)
    refused = claim(out)
    assert refused.startswith(f"output.dir: another run claimed {out} after this one found it empty (run "
                              f"{first['run_id'][:8]} on ")
    assert read_manifest(out) == first and resume_problems(out) == []
    (tmp_path / "run" / MANIFEST).write_text("not json")
    assert read_manifest(out) is None and resume_problems(out)
