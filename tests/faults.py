"""Faults the failure tests inject below raylaunch: a storage filesystem whose upload dies midway.
(Faults inside the training loop are `trainers.loop._fault`'s.)"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import fsspec
import ray.cloudpickle
from pyarrow.fs import FSSpecHandler, PyFileSystem


class DyingUpload(FSSpecHandler):
    """This machine's disk, as Ray Train's storage: the process that opens a file named `victim`
    there for writing for the `nth` time dies by SIGKILL at that moment, once (the marker file
    records it). Ray Train's workers upload their own checkpoint files, `rng_rank1.pt` after rank
    1's DeepSpeed state: killing rank 1 there leaves a checkpoint folder half uploaded."""

    def __init__(self, victim: str, nth: int, marker: Path):
        super().__init__(fsspec.filesystem("file"))
        self.victim, self.nth, self.marker = victim, nth, str(marker)

    def open_output_stream(self, path, metadata):
        if os.path.basename(path) == self.victim and not os.path.exists(self.marker):
            count = Path(f"{self.marker}.count")
            seen = int(count.read_text()) + 1 if count.exists() else 1
            count.write_text(str(seen))
            if seen == self.nth:
                Path(self.marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().open_output_stream(path, metadata)


def dying_upload(victim: str, nth: int, marker: Path) -> PyFileSystem:
    # Ray's workers cannot import this test module: its classes travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return PyFileSystem(DyingUpload(victim, nth, marker))


class FailingUpload(FSSpecHandler):
    """This machine's disk, as Ray Train's storage, where opening a file named `victim` for writing
    fails (OSError, as a storage service's passing error) on the `nth` through `nth + times - 1`-th
    opens. The counts are kept in `counter` (every worker process sees them)."""

    def __init__(self, victim: str, nth: int, times: int, counter: Path):
        super().__init__(fsspec.filesystem("file"))
        self.victim, self.nth, self.times, self.counter = victim, nth, times, str(counter)

    def open_output_stream(self, path, metadata):
        if os.path.basename(path) == self.victim:
            count = Path(self.counter)
            seen = int(count.read_text()) + 1 if count.exists() else 1
            count.write_text(str(seen))
            if self.nth <= seen < self.nth + self.times:
                raise OSError(f"injected: the storage refused {os.path.basename(path)}")
        return super().open_output_stream(path, metadata)


def failing_upload(victim: str, nth: int, times: int, counter: Path) -> PyFileSystem:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return PyFileSystem(FailingUpload(victim, nth, times, counter))
