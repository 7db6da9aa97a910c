"""A real `prefect server start` for tests, the environment of its workers, and the GPU pool's
deployment made by the project's own scripts.

A real server rather than prefect_test_harness: the server's settings (an auth string, CSRF
protection, CORS) are then its own environment, as on the host that serves the API. The one
helper that starts a server for the tests (test_fan_out, test_api_auth, test_schedule).
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, get_current_settings
from prefect.settings import temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from tasks.config import DATASETS_DIR, REPO_ROOT
from tasks.fan_out import online_workers

SERVER_STARTUP_SECONDS = 180    # the shared 2-core test host starts it in 20-60 s
SERVER_STOP_SECONDS = 30
WORKERS_ONLINE_SECONDS = 300   # it returns as soon as they are online
SERVER_LOG = "server.log"       # in the server's PREFECT_HOME
DEPLOYMENT = "generate-shards/gpu"
GPU_POOL = "distill-gpu"
RUN_DATE = date(2026, 3, 1)
SHARD_SIZE = 2                  # the demo's 12 prompts in 6 shards
AUTH_STRING = secrets.token_urlsafe(24)
UI_ORIGIN = "https://prefect.internal.example"     # the UI behind its TLS proxy
SECURED = {"PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
           "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": UI_ORIGIN}
"""A server's settings beside its auth string as docs/deployments.md (Security) says."""
SCRIPT_SECONDS = 120            # a deployments/ script under load
REFUSED = re.compile(r"\b(401 Unauthorized|403 Forbidden)\b")   # httpx's words for them
PROVENANCE = {"generated_run_id", "generated_at", "published_run_id", "published_at",
              "generated_dirty"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_env(**extra: str) -> dict[str, str]:
    """This process's environment for a Prefect subprocess, talking to the API this process
    talks to (its URL and auth string) and to nothing else of this process's Prefect
    settings; workers poll every second."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "DISTILL_CRASH_AT"}
    api = get_current_settings().api
    if api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = api.auth_string.get_secret_value()
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PATH": path, "PREFECT_API_URL": api.url, "DISTILL_REPO": str(REPO_ROOT),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def prefect_server(home: Path, auth_string: str | None = None, **settings: str
                   ) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 at a free port, its database and log in `home`,
    with `settings` (PREFECT_SERVER_* variables) and `auth_string` as the server's
    PREFECT_SERVER_API_AUTH_STRING; this process's client talks to it (with the auth string)
    until the server is stopped. Yields the API URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **settings}
    if auth_string is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    with (home / SERVER_LOG).open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        _wait_until_healthy(url, server, home / SERVER_LOG)
        with temporary_settings(updates={PREFECT_API_URL: url,
                                         PREFECT_API_AUTH_STRING: auth_string}):
            try:
                yield url
            finally:
                run_coro_as_sync(_drain_to_server())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    """Until /api/health answers (it needs no auth string), the server exits, or the time
    runs out; the last two fail naming the server's log."""
    deadline = time.monotonic() + SERVER_STARTUP_SECONDS
    while True:
        assert server.poll() is None, f"prefect server exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (
            f"prefect server not healthy after {SERVER_STARTUP_SECONDS} s: "
            f"{log.read_text()[-3000:]}")
        time.sleep(0.5)


async def _drain_to_server() -> None:
    """Logs and events of this process's flow runs sent before the server stops, so that none
    is sent to the next test module's server (as prefect_test_harness does)."""
    for drained in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
        if inspect.isawaitable(drained):
            await drained


def deploy_gpu_pool(**extra: str) -> str:
    """The pools, the automation that crashes silent shares and the GPU workers' deployment,
    made by deployments/setup-pool.sh and `prefect deploy` as the README says. Returns the
    deployment's name."""
    env = prefect_env(**extra)
    for command in (["bash", "deployments/setup-pool.sh"],
                    [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                     "deployments/prefect.yaml", "--name", "gpu"]):
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        shares = client.read_deployment_by_name(DEPLOYMENT)
    assert shares.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    return DEPLOYMENT


def wait_for_workers(count: int, pool: str = GPU_POOL) -> None:
    deadline = time.monotonic() + WORKERS_ONLINE_SECONDS
    while online_workers(pool) < count:
        assert time.monotonic() < deadline, f"{count} workers did not come online in {pool}"
        time.sleep(1)


def short_demo_config(folder: Path) -> str:
    """The demo's config with 32-token samples (it draws 256), kept although they stop at
    max_tokens: the tests that use it are about workers. Returns its path."""
    text = (DATASETS_DIR / "demo.yaml").read_text()
    assert "max_tokens: 256" in text and "keep_truncated: false" in text
    path = folder / "demo.yaml"
    path.write_text(text.replace("max_tokens: 256", "max_tokens: 32").replace(
        "keep_truncated: false", "keep_truncated: true"))
    return str(path)


def published(data_dir: Path, summary: dict) -> pa.Table:
    """The date's published demo rows without their provenance, in (prompt, sample) order."""
    path = (data_dir / "published" / "dataset=demo" / f"generation={summary['generation']}"
            / f"run_date={RUN_DATE}" / "data.parquet")
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.column_names if c in PROVENANCE]).sort_by(
        [("prompt_id", "ascending"), ("sample_index", "ascending")])


def child_runs(run_id: str) -> dict[str, FlowRun]:
    """The GPU shares of a run by round and share ("r1-0"): child flow runs named after the
    run (tasks/fan_out.py)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=run_id)))
    return {run.name.removeprefix(f"{run_id}-"): run for run in runs}
