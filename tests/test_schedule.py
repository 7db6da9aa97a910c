"""The nightly schedule fires, as users deploy it: a real `prefect server start`
(tests/prefect_servers.py: its own PREFECT_HOME and SQLite database, on a free port), the work
pools deployments/prefect.yaml names, `prefect deploy --all` from that file, and the server's own
scheduler creating demo-nightly's runs at the cron's next times. A dependency that breaks
scheduling (SQLAlchemy 2.1 under Prefect 3.7 did, in the server log only) fails here. The pools
are made through the API, not deployments/setup-pool.sh, whose three CLI starts would double
the test's time under load (tests/test_fan_out.py runs that script).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from croniter import croniter
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState,
    FlowRunFilterStateType)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort

from prefect_servers import SERVER_LOG, prefect_env, prefect_server
from tasks.config import REPO_ROOT

PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
DEPLOYMENT = "demo-nightly"
DEPLOY_SECONDS = 120           # `prefect deploy` imports the flows
SCHEDULED_WITHIN_SECONDS = 300  # the scheduler looks at new deployments every 5 s; the wait
                                # ends as soon as it has
MIN_RUNS = 3                   # the server's default PREFECT_API_SERVICES_SCHEDULER_MIN_RUNS


@pytest.fixture(scope="module")
def server_home(tmp_path_factory) -> Iterator[Path]:
    """The PREFECT_HOME of a `prefect server start` of this module's, which this process
    talks to until the end of the module."""
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home):
        yield home


def scheduled_runs(deployment_id) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def test_demo_nightly_gets_scheduled_runs_at_its_crons_next_times(server_home):
    config = yaml.safe_load(PREFECT_FILE.read_text())
    entry = next(d for d in config["deployments"] if d["name"] == DEPLOYMENT)
    (schedule,) = entry["schedules"]
    deployed_at = datetime.now(timezone.utc)
    with get_client(sync_client=True) as client:
        for pool in {d["work_pool"]["name"] for d in config["deployments"]}:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
         str(PREFECT_FILE), "--all"],
        cwd=REPO_ROOT, env=prefect_env(PREFECT_HOME=str(server_home)), capture_output=True,
        text=True, timeout=DEPLOY_SECONDS)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"distill/{DEPLOYMENT}")
    (deployed,) = deployment.schedules
    assert (deployed.schedule.cron, deployed.schedule.timezone, deployed.active) == (
        schedule["cron"], schedule["timezone"], True)
    deadline = time.monotonic() + SCHEDULED_WITHIN_SECONDS
    while len(runs := scheduled_runs(deployment.id)) < MIN_RUNS:
        assert time.monotonic() < deadline, (
            f"{len(runs)} scheduled runs after {SCHEDULED_WITHIN_SECONDS} s; server log:\n"
            + (server_home / SERVER_LOG).read_text()[-5000:])
        time.sleep(1)
    observed_at = datetime.now(timezone.utc)

    zone = ZoneInfo(schedule["timezone"])
    times = [run.expected_start_time for run in runs]
    # The scheduler starts from the moment it looks, some time in [deployed_at, observed_at];
    # only a cron time inside that window can make its first run the cron's next-but-one.
    firsts = {croniter(schedule["cron"], moment.astimezone(zone)).get_next(datetime)
              for moment in (deployed_at, observed_at)}
    assert times[0] in firsts, (times, firsts)
    following = croniter(schedule["cron"], times[0].astimezone(zone))
    assert times[1:] == [following.get_next(datetime) for _ in times[1:]]
    assert all(run.parameters == entry["parameters"] for run in runs), runs
