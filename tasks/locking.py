"""OS file locks, released even if the holder dies: one run per (dataset, run date) at a time,
and one user at a time of what runs of different dates share (the GX context).

A lock file is opened without following a symlink and used only if it is a plain file with
one link, so a link planted in the data dir never lets a run truncate a file elsewhere."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from datetime import date, datetime, UTC
from pathlib import Path
from typing import TextIO

#: run_lock keeps trying at least this long, so that another run's instant liveness probe
#: (run_in_progress) never makes a starting run refuse.
MIN_WAIT_SECONDS = 1.0


class RunLocked(RuntimeError):
    """Another run of the same dataset and date holds the lock."""


class UnsafeLockFile(RuntimeError):
    """A lock path is a symlink, a hard link or not a plain file: someone else's file."""


def open_lock_file(path: Path) -> TextIO:
    """The lock file at `path` for reading and writing, created if missing, never a file
    reached through a link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644)
    except OSError as error:
        raise UnsafeLockFile(f"lock file {path}: cannot open it without following links "
                             f"({error.strerror}); remove it if it is a symlink") from None
    facts = os.fstat(descriptor)
    if not stat.S_ISREG(facts.st_mode) or facts.st_nlink != 1:
        os.close(descriptor)
        raise UnsafeLockFile(f"lock file {path}: not a plain file with a single link; "
                             "refusing to lock or write it")
    return os.fdopen(descriptor, "r+")


def lock_path(data_dir: Path, dataset: str, run_date: date) -> Path:
    return data_dir / "locks" / f"{dataset}-{run_date.isoformat()}.lock"


@contextlib.contextmanager
def run_lock(data_dir: Path, dataset: str, run_date: date, wait_seconds: float = 0.0
             ) -> Iterator[None]:
    """Hold the lock of (dataset, run_date); wait up to `wait_seconds`, then refuse."""
    handle = open_lock_file(lock_path(data_dir, dataset, run_date))
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
    with open_lock_file(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, waiting for it as long as it takes."""
    with open_lock_file(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
