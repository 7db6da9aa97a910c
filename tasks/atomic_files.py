"""Files that are either wholly there or not there: write beside, fsync, rename over, fsync the
folder (without it a power loss can lose the rename that the catalog already records).

The temporary file is created new (O_CREAT | O_EXCL | O_NOFOLLOW) under an unpredictable name
and written through its own descriptor, and the rename replaces a symlink planted at the
target instead of writing through it. Folders are taken as the OS resolves them: a symlinked
folder inside the data dir is followed (the data dir's owner is trusted with its folders;
names that reach a path are checked in `tasks.layout`). A writer that dies leaves only a
hidden temporary file whose name carries its host and pid; the next run on that host removes
it once that pid is gone (GPU workers on other machines may write into the same shared
folders).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.faults import crash_point

HOST = socket.gethostname().replace(".", "-")


def _umask() -> int:
    """The process's umask (mkstemp creates files 0600; published files get the mode an
    ordinary open would give), read without setting it: `os.umask` would leave a window in
    which another thread's new file gets mode 0o666."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status")


def write_atomically(table: pa.Table, path: Path, crash_point_name: str = "write") -> None:
    """Write a Parquet file to a temporary file in the same folder, fsync, then rename over
    `path`."""
    _replace_atomically(path, lambda handle: pq.write_table(table, handle), crash_point_name)


def write_text_atomically(text: str, path: Path, crash_point_name: str = "write") -> None:
    """`write_atomically` for a text file (a dataset card, a work order)."""
    _replace_atomically(path, lambda handle: handle.write(text.encode()), crash_point_name)


def replace_durably(source: Path, target: Path) -> None:
    """`os.replace`, then fsync the folders whose entries changed, so the rename survives a
    power loss."""
    os.replace(source, target)
    for folder in dict.fromkeys((target.parent, source.parent)):
        fsync_folder(folder)


def make_folders(folder: Path) -> None:
    """`mkdir -p`, with each new folder's entry fsynced into its parent."""
    for new in [f for f in (*reversed(folder.parents), folder) if not f.exists()]:
        new.mkdir(exist_ok=True)
        fsync_folder(new.parent)


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object],
                        crash_point_name: str) -> None:
    make_folders(path.parent)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.{HOST}.{os.getpid()}.",
                                        suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point(crash_point_name)
        replace_durably(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(*folders: Path) -> int:
    """Delete temporary files left by writers of this host that died (their names carry host
    and pid); the temporaries of live writers (another run at work) and of other hosts stay."""
    removed = 0
    for temporary in (t for folder in folders for t in folder.rglob(".*.tmp")):
        parts = temporary.name.rsplit(".", 4)      # name, host, pid, random part, "tmp"
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
