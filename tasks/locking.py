"""One run per (dataset, run date) at a time: an OS file lock, released even if the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import date, datetime, UTC
from pathlib import Path


class RunLocked(RuntimeError):
    """Another run of the same dataset and date holds the lock."""


@contextlib.contextmanager
def run_lock(data_dir: Path, dataset: str, run_date: date, wait_seconds: float = 0.0
             ) -> Iterator[None]:
    """Hold the lock of (dataset, run_date); wait up to `wait_seconds`, then refuse."""
    path = data_dir / "locks" / f"{dataset}-{run_date.isoformat()}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    deadline = time.monotonic() + wait_seconds
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
                time.sleep(1.0)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(),
                                 "since": datetime.now(UTC).isoformat()}))
        handle.flush()
        yield
    finally:
        handle.close()
