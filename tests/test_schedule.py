"""The nightly schedule fires, as users deploy it: a real `prefect server start` (its own
PREFECT_HOME and SQLite database, on a free port), the work pools deployments/prefect.yaml names,
`prefect deploy --all` from that file, and the server's own scheduler creating demo-nightly's
runs at the cron's next times. A dependency that breaks scheduling (SQLAlchemy 2.1 under
Prefect 3.7 did, in the server log only) fails here. The pools are made through the API, not
deployments/setup-pool.sh, whose three CLI starts would double the test's time under load
(tests/test_fan_out.py runs that script).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
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
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.config import REPO_ROOT

PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
DEPLOYMENT = "demo-nightly"
SERVER_START_SECONDS = 90      # migrations of a new database, on a busy 2-core machine
DEPLOY_SECONDS = 120           # `prefect deploy` imports the flows
SCHEDULED_WITHIN_SECONDS = 60  # the server's scheduler looks at new deployments every 5 s
MIN_RUNS = 3                   # the server's default PREFECT_API_SERVICES_SCHEDULER_MIN_RUNS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class Server(NamedTuple):
    env: dict[str, str]  # what its CLI commands run with: its API URL, PREFECT_HOME, PATH
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """A `prefect server start` of its own, stopped at the end of the module."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "DISTILL_REPO": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    log_path = home / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui", "--analytics-off"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not server_answers(api_url):
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no server:\n{log_path.read_text()}"
            time.sleep(1)
        yield Server(env, log_path)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def scheduled_runs(deployment_id) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def test_demo_nightly_gets_scheduled_runs_at_its_crons_next_times(server):
    config = yaml.safe_load(PREFECT_FILE.read_text())
    entry = next(d for d in config["deployments"] if d["name"] == DEPLOYMENT)
    (schedule,) = entry["schedules"]
    deployed_at = datetime.now(timezone.utc)
    with temporary_settings({PREFECT_API_URL: server.env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            for pool in {d["work_pool"]["name"] for d in config["deployments"]}:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
             str(PREFECT_FILE), "--all"],
            cwd=REPO_ROOT, env=server.env, capture_output=True, text=True,
            timeout=DEPLOY_SECONDS)
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
                + server.log.read_text()[-5000:])
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
