"""OS file locks, released even if the holder dies: one run per (dataset, run date) at a time,
and one user at a time of what runs of different dates share (the GX context)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import date, datetime, UTC
from pathlib import Path

#: run_lock keeps trying at least this long, so that another run's instant liveness probe
#: (run_in_progress) never makes a starting run refuse.
MIN_WAIT_SECONDS = 1.0


class RunLocked(RuntimeError):
    """Another run of the same dataset and date holds the lock."""


def lock_path(data_dir: Path, dataset: str, run_date: date) -> Path:
    return data_dir / "locks" / f"{dataset}-{run_date.isoformat()}.lock"


@contextlib.contextmanager
def run_lock(data_dir: Path, dataset: str, run_date: date, wait_seconds: float = 0.0
             ) -> Iterator[None]:
    """Hold the lock of (dataset, run_date); wait up to `wait_seconds`, then refuse."""
    path = lock_path(data_dir, dataset, run_date)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    deadline = time.monotonic() + max(wait_seconds, MIN_WAIT_SECONDS)
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown holder"
                    raise RunLocked(f"another run of {dataset} for {run_date} is in progress "
                                    f"({holder}); not starting a second one") from None
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(),
                                 "since": datetime.now(UTC).isoformat()}))
        handle.flush()
        yield
    finally:
        handle.close()


def run_in_progress(data_dir: Path, dataset: str, run_date: date) -> bool:
    """Whether a run of (dataset, run_date) holds its lock now; a run that died holds none."""
    path = lock_path(data_dir, dataset, run_date)
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, waiting for it as long as it takes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
