"""Which run a run directory belongs to, and what a run that ends early leaves in it.

`raylaunch-run.json` is the first file a run writes, and only if there is none yet (a conditional
create, at a URI too): of two runs started at the same empty `output.dir`, the second is refused
instead of sharing the folder (and a URI's staging folder) with the first. `--resume` continues only
a directory holding it: resuming unpickles DeepSpeed's and Tune's checkpoints, so it must not be
pointed at a folder raylaunch did not write. The manifest guards against mistakes, not against
someone who can write the folder: they could write a manifest too.

A run refused or failed before any stage finished removes what it wrote (`discard`), so the same
command, corrected, runs into the same `output.dir`. `Run` is what a run's stages share.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.remote import RAY_DIR, create_exclusive, join, read_text, remove_tree, upload
from runconfig.resolved import ResolvedConfig
from runconfig.schema import RunConfig

if TYPE_CHECKING:
    from rich.console import Console

    from launcher.live import Live

MANIFEST = "raylaunch-run.json"


@dataclass(frozen=True)
class Run:
    """What every stage of a run shares: the config it uses, where it lives, how it reports, and
    its record (summary.json, kept as the stages finish). What a stage produces is in its result."""

    resolved: ResolvedConfig
    run_dir: Path
    """The run directory, or for a URI `output.dir` its local staging folder, copied up to it."""
    remote: str | None
    """output.dir when it is a URI."""
    console: Console
    live: Live
    """Progress bars and the metric logs (TensorBoard, MLflow)."""
    resources: dict
    """The Ray cluster's resources."""
    summary: dict
    resume: bool = False
    reads_before: dict = field(default_factory=dict)
    """How the interrupted run this one resumes read each training stage's splits (held in memory or not)."""

    @property
    def cfg(self) -> RunConfig:
        return self.resolved.run

    @property
    def cache_root(self) -> Path:
        return cache_root(self.cfg, self.run_dir, self.remote)

    @property
    def storage(self) -> Path | str:
        """Ray Train's and Tune's storage_path."""
        return join(self.remote, RAY_DIR) if self.remote else self.run_dir / RAY_DIR

    def shared(self, path: Path) -> str:
        """A file of the run directory where workers on any node can read it: at the URI for a URI
        run (copied up at the end of the stage that wrote it), else the path itself."""
        return join(self.remote, path.relative_to(self.run_dir).as_posix()) if self.remote else str(path)

    def sync(self) -> None:
        """Copy a URI run's staging folder up to its URI."""
        if self.remote:
            upload(self.run_dir, self.remote)


def cache_root(cfg: RunConfig, run_dir: Path, remote: str | None) -> Path:
    """Where the data cache is: data.cache_dir, else beside the run directory (a URI run's in the home folder)."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).resolve()
    return Path.home() / ".cache" / "raylaunch" / "data" if remote else run_dir.parent / ".cache" / "data"


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

