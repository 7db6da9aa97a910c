"""Files that are either wholly there or not there: write beside, fsync, rename over.

A writer that dies leaves only a hidden temporary file named after its host and pid, which
the next run on that host removes once that pid is gone (GPU workers on other machines may
write into the same shared folders).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.faults import crash_point

HOST = socket.gethostname().replace(".", "-")


def write_atomically(table: pa.Table, path: Path, crash_point_name: str = "write") -> None:
    """Write a Parquet file to a temporary file in the same folder, fsync, then rename over
    `path`."""
    _replace_atomically(path, lambda temporary: pq.write_table(table, temporary),
                        crash_point_name)


def write_text_atomically(text: str, path: Path, crash_point_name: str = "write") -> None:
    """`write_atomically` for a text file (a dataset card, a work order)."""
    _replace_atomically(path, lambda temporary: temporary.write_text(text), crash_point_name)


def _replace_atomically(path: Path, write: Callable[[Path], object],
                        crash_point_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    crash_point(crash_point_name)
    os.replace(temporary, path)


def remove_stale_temporaries(*folders: Path) -> int:
    """Delete temporary files left by writers of this host that died (their names carry host
    and pid); the temporaries of live writers (another run at work) and of other hosts stay."""
    removed = 0
    for temporary in (t for folder in folders for t in folder.rglob(".*.tmp")):
        parts = temporary.name.rsplit(".", 4)      # name, host, pid, thread, "tmp"
        if len(parts) < 5:
            continue
        host, pid = parts[1], parts[2]
        if host == HOST and pid.isdigit() and not _alive(int(pid)):
            temporary.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
