"""Creates (or replaces) the automation that marks a GPU share's flow run Crashed once its
heartbeats stop.

A GPU machine that is lost mid-run (power, network, eviction) cannot report its flow runs'
end, so they would stay Running and the distill flow waiting on them would wait for ever;
marked Crashed, their unwritten shards are dealt out again (tasks/fan_out.py). Shard worker
runs (flow `generate-shards`) send a heartbeat every 30 s (the `gpu` deployment's environment
in prefect.yaml; Prefect's default is 180 s, its least 30 s); one silent for
DISTILL_UNRESPONSIVE_AFTER_SECONDS (default 90: three heartbeats; less is refused, as a busy
host can delay a live share's heartbeat past one or two intervals) is crashed. Prefect's recipe:
docs.prefect.io/v3/advanced/detect-zombie-flows.

    python deployments/crash_unresponsive_runs.py      # setup-pool.sh runs it
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

logger = logging.getLogger("crash_unresponsive_runs")

NAME = "distill: crash unresponsive GPU shares"
SHARD_WORKER_FLOW = "generate-shards"          # flows/shard_worker.py
#: The gpu deployment's PREFECT_FLOWS_HEARTBEAT_FREQUENCY in deployments/prefect.yaml: change
#: both together, or healthy shares are crashed (or lost ones found late).
SHARE_HEARTBEAT_SECONDS = 30
#: Heartbeats a share may miss before it is crashed: fewer, and a live share on a loaded host
#: (its heartbeat delayed) is crashed and its shards redone.
MISSED_HEARTBEATS = 3


def unresponsive_after() -> timedelta:
    """DISTILL_UNRESPONSIVE_AFTER_SECONDS, refused (naming it) below MISSED_HEARTBEATS."""
    least = MISSED_HEARTBEATS * SHARE_HEARTBEAT_SECONDS
    seconds = float(os.environ.get("DISTILL_UNRESPONSIVE_AFTER_SECONDS", least))
    if seconds < least:
        raise ValueError(f"DISTILL_UNRESPONSIVE_AFTER_SECONDS={seconds:g} is less than "
                         f"{MISSED_HEARTBEATS} heartbeats ({least} s): live shares of a busy "
                         f"host would be crashed")
    return timedelta(seconds=seconds)


def automation(silent_for: timedelta) -> Automation:
    """After a share's heartbeat, expect another heartbeat or its end within `silent_for`."""
    return Automation(
        name=NAME,
        description="A generate-shards flow run whose heartbeats stopped (its machine was "
                    "lost) is marked Crashed, so its run deals its shards out again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": SHARD_WORKER_FLOW}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silent_for,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {silent_for.total_seconds():.0f} s: its machine "
                    "stopped answering")],
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        Automation.read(name=NAME).delete()
    except ValueError:                           # not made yet
        pass
    silent_for = unresponsive_after()
    automation(silent_for).create()
    logger.info("automation %r: a %s run silent for %.0f s is marked Crashed", NAME,
                SHARD_WORKER_FLOW, silent_for.total_seconds())


if __name__ == "__main__":
    main()
