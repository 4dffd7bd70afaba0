"""A run directory at a URI (`output.dir: s3://bucket/runs/x`, `gs://...`, `file:///...`): any
filesystem pyarrow builds from a URI.

Ray Train and Tune write their checkpoints there themselves (their storage_path is `URI/ray`): each
worker uploads its own part, from whichever node it runs on. What the driver writes (config,
summary, reports, exported models, metric logs) is written to a local staging folder and copied up
after every stage and at the end; a `--resume` first copies the run down (all but `ray/`, which
Ray reads where it is). Paths are plain strings here: a URI, or a local path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pyarrow.fs as pafs

RAY_DIR = "ray"  # Ray Train / Tune storage inside a run directory

# The scheme of a URI for each pyarrow filesystem that has one (its `type_name`).
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}


def is_uri(path: str | Path) -> bool:
    """Whether a path is a URI (`s3://`, `gs://`, `file://`, ...) rather than a local path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)))


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI, and the path within it; for a local path, the local
    filesystem and the absolute path."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """A path in `fs` (a Ray checkpoint's `filesystem` and `path`) as a URI any process can open
    again: `s3://bucket/...`, or the plain path for the local filesystem."""
    scheme = _SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def exists(path: str | Path) -> bool:
    """Whether a file or folder is there, at a URI or a local path."""
    if not is_uri(path):
        return Path(path).exists()
    fs, inner = filesystem(str(path))
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_empty_dir(path: str | Path) -> bool:
    """True for a folder with nothing in it or nothing there at all (object stores have no empty
    folders), at a URI or a local path."""
    if not is_uri(path):
        path = Path(path)
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    fs, path = filesystem(str(path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def read_text(path: str | Path) -> str | None:
    """A file's text at a URI or a local path; None where there is no such file."""
    if not is_uri(path):
        path = Path(path)
        return path.read_text() if path.is_file() else None
    fs, inner = filesystem(str(path))
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def create_exclusive(path: str | Path, text: str) -> bool:
    """Write a new file at `path` (a URI or a local path) unless one is there already: True if this
    call created it, False if it found one. Atomic where the store offers a conditional create: a
    local or `file://` path (O_EXCL), S3 (a PUT with If-None-Match, through boto3). Other stores
    are checked first and written after, which two writers starting within moments can both pass."""
    if not is_uri(path) or str(path).startswith("file://"):
        local = Path(str(path).removeprefix("file://")) if is_uri(path) else Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    fs, inner = filesystem(str(path))
    if fs.type_name == "s3":
        return _s3_create_exclusive(str(path), inner, text)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        return False
    fs.create_dir(inner.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())
    return True


def _s3_create_exclusive(uri: str, inner: str, text: str) -> bool:
    """S3's conditional write (If-None-Match: *): the store itself refuses a second object at the key."""
    from urllib.parse import parse_qs, urlparse

    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = inner.partition("/")
    # pyarrow takes the endpoint and region from the URI's query where given; boto3 reads the rest
    # (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, credentials) from the environment as pyarrow does.
    query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"))
    try:
        client.put_object(Bucket=bucket, Key=key, Body=text.encode(), IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return False
        raise
    return True


def remove_tree(path: str | Path) -> None:
    """Remove a folder and everything in it, at a URI or a local path (nothing there is fine)."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = filesystem(str(path))
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def remove_dirs(parent: str | Path, prefix: str, keep: set[str]) -> list[str]:
    """Remove the folders of `parent` (a URI or a local path) whose names start with `prefix`,
    except those in `keep`; returns the names removed."""
    fs, root = filesystem(parent)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    removed = sorted(i.base_name for i in infos
                     if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix) and i.base_name not in keep)
    for name in removed:
        fs.delete_dir(f"{root.rstrip('/')}/{name}")
    return removed


def staging_dir(uri: str) -> Path:
    """Where the driver writes a URI run's own files before they are copied up: under the user's
    cache, one folder per URI."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "raylaunch" / "staging" / digest


def upload(local: Path, uri: str) -> None:
    """Copy a local folder's files up to `uri` (the same relative paths), overwriting what is there."""
    fs, root = filesystem(uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(local), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local: Path, skip: tuple[str, ...] = (RAY_DIR,)) -> None:
    """Copy a run at `uri` into an empty local folder, all but the top-level entries in `skip`."""
    fs, root = filesystem(uri)
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.base_name not in skip:
            _copy_down(fs, info, local / info.base_name)


def _copy_down(fs: pafs.FileSystem, info: pafs.FileInfo, target: Path) -> None:
    """A file or a whole folder of `fs` to a local path (pyarrow's copy_files makes no local folders)."""
    files = [info] if info.type == pafs.FileType.File else [
        i for i in fs.get_file_info(pafs.FileSelector(info.path, recursive=True)) if i.type == pafs.FileType.File]
    for item in files:
        local = target / item.path[len(info.path.rstrip("/")) + 1:] if item is not info else target
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(item.path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def fetch(source: str | Path, names: tuple[str, ...], target: Path) -> None:
    """Copy the named files of a folder (a URI or a local path) into the local folder `target`."""
    target.mkdir(parents=True, exist_ok=True)
    if not is_uri(source):
        for name in names:
            shutil.copy2(Path(source) / name, target / name)
        return
    fs, root = filesystem(str(source))
    for name in names:
        if fs.get_file_info(join(root, name)).type != pafs.FileType.File:
            raise FileNotFoundError(f"{join(str(source), name)}: no such file")
        pafs.copy_files(join(root, name), str(target / name), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())


def local_dir(source: str) -> str:
    """A folder a process can read from its own disk: `source` itself when it is a path, else a
    copy of the folder at the URI in a temporary folder (left for the process's lifetime)."""
    if not is_uri(source):
        return source
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="raylaunch-"))
    fs, root = filesystem(source)
    _copy_down(fs, fs.get_file_info(root), target)
    return str(target)
