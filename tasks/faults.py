"""Named crash points for the fault suite:
`DISTILL_CRASH_AT=<point>[:<n>][:machine][:share=<share>]` kills this process with SIGKILL the
n-th time (default first) it reaches <point>; with `:machine` it stops its whole process group
instead (SIGSTOP: a worker and its flow run freeze mid-work and nothing reports their end, as
when a machine stops answering). With `:share=<share>` (`share=r1-0`) only the GPU share of that
name stops, the child flow run `<run id>-<share>` (tasks/fan_out.py), whichever worker runs it:
set on every worker, it crashes one share however the workers happen to take them. Unset, it
does nothing.

Points are counted per process (a process worker runs each share in a process of its own), over
all its threads: when the n-th arrival dies, writers on other threads may not have started, be
mid-write, or be past the point, as timing has it. A test reads what they left from the disk;
it does not assume how many were in flight."""

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
    name, *options = wanted.split(":")
    if name != point or not _in_share(options):
        return
    count = next((int(option) for option in options if option.isdigit()), 1)
    with _lock:
        _reached[point] += 1
        if _reached[point] == count:
            if "machine" in options:
                os.killpg(os.getpgid(0), signal.SIGSTOP)
            else:
                os.kill(os.getpid(), signal.SIGKILL)


def _in_share(options: list[str]) -> bool:
    """Whether this process runs the share the `share=` option names (any, without one)."""
    share = next((option.removeprefix("share=") for option in options
                  if option.startswith("share=")), None)
    if share is None:
        return True
    # only here: the atomic writers that call crash_point need not import Prefect
    from prefect.runtime import flow_run

    return str(flow_run.get_name()).endswith(f"-{share}")
