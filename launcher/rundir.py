"""Which run a run directory belongs to, and what a run that ends early leaves in it.

`raylaunch-run.json` is the first file a run writes, and only if there is none yet (a conditional
create, at a URI too): of two runs started at the same empty `output.dir`, the second is refused
instead of sharing the folder (and a URI's staging folder) with the first. `--resume` continues only
a directory holding it: resuming unpickles DeepSpeed's and Tune's checkpoints, so it must not be
pointed at a folder raylaunch did not write. The manifest guards against mistakes, not against
someone who can write the folder: they could write a manifest too.

A run refused or failed before any stage finished removes what it wrote (`discard`), so the same
command, corrected, runs into the same `output.dir`.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from pathlib import Path

from cluster.remote import create_exclusive, join, read_text, remove_tree

MANIFEST = "raylaunch-run.json"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raylaunch")
    except PackageNotFoundError:
        return "unknown"


def claim(out: str) -> str | None:
    """Write the manifest of a new run at `out` (a path or a URI). None once written; where another
    run claimed the directory since it was checked empty, the problem line refusing this one."""
    manifest = {"raylaunch": _version(), "run_id": uuid.uuid4().hex, "host": socket.gethostname(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if create_exclusive(join(str(out), MANIFEST), json.dumps(manifest, indent=1)):
        return None
    other = read_manifest(out) or {}
    return (f"output.dir: another run claimed {out} after this one found it empty (run {other.get('run_id', '?')[:8]} "
            f"on {other.get('host', '?')}, started {other.get('created', '?')}); choose another output.dir")


def read_manifest(out: str) -> dict | None:
    """The manifest of the run at `out`, or None where there is none (or it is not raylaunch's)."""
    text = read_text(join(str(out), MANIFEST))
    try:
        manifest = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return manifest if isinstance(manifest, dict) and "run_id" in manifest else None


def resume_problems(out: str) -> list[str]:
    """Why `--resume` must not continue the directory at `out`: raylaunch did not write it."""
    if read_manifest(out) is not None:
        return []
    return [f"--resume: {out} holds no {MANIFEST}, so raylaunch did not start it (or an older version did); resuming "
            f"unpickles the run's checkpoints, so only a run raylaunch started can be continued"]


def discard(run_dir: Path, remote: str | None, created: bool) -> None:
    """Remove what a run wrote: its folder (`created`: this run made it; else only what is in it),
    and for a URI run the files at the URI and its staging folder."""
    if remote:
        remove_tree(remote)
        shutil.rmtree(run_dir, ignore_errors=True)
    elif created:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        for entry in run_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

