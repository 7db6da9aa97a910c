"""Named crash points for the fault suite: `DISTILL_CRASH_AT=<point>[:<n>]` kills this
process with SIGKILL the n-th time (default first) it reaches <point>. Unset, it does nothing."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

_reached: Counter[str] = Counter()
_lock = threading.Lock()


def crash_point(point: str) -> None:
    """Die here, uncleanly, if the environment asks for it (tests of crash safety)."""
    wanted = os.environ.get("DISTILL_CRASH_AT")
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != point:
        return
    with _lock:
        _reached[point] += 1
        if _reached[point] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
