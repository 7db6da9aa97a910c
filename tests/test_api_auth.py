"""The several-machine path through an authenticated Prefect API: a real `prefect server start`
with an auth string, CSRF protection and CORS limited to the UI's origin, set as
docs/deployments.md (Security) says; the project's scripts refuse an API beyond loopback
without an auth string."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.distill import distill
from prefect_servers import (RUN_DATE, SHARD_SIZE, child_runs, deploy_gpu_pool,
                             prefect_env, prefect_server, published, short_demo_config,
                             wait_for_workers)
from tasks.config import REPO_ROOT

AUTH_STRING = secrets.token_urlsafe(24)
UI_ORIGIN = "https://prefect.internal.example"     # the UI behind its TLS proxy
SERVER_SETTINGS = {"PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
                   "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": UI_ORIGIN}
SCRIPTS = ["deployments/setup-pool.sh", "deployments/start-gpu-workers.sh"]
SCRIPT_SECONDS = 120
REFUSED = re.compile(r"\b(401 Unauthorized|403 Forbidden)\b")   # httpx's words for them
NETWORK_URLS = ["http://10.0.0.5:4200/api", "http://[fd00::5]:4200/api",
                "https://localhost.internal.example/api"]


@pytest.fixture(scope="module")
def api_url(tiny_pair, tmp_path_factory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_TINY_MODELS_DIR", str(Path(tiny_pair[0]).parent))
        with prefect_server(tmp_path_factory.mktemp("prefect-home"), auth_string=AUTH_STRING,
                            **SERVER_SETTINGS) as url:
            yield url


def client_env(home: Path, **settings: str) -> dict[str, str]:
    """A Prefect client's environment with its own empty profile (nothing of this user's
    profiles) and `settings` in place of this process's API settings."""
    env = {k: v for k, v in prefect_env().items()
           if k not in {"PREFECT_API_URL", "PREFECT_API_AUTH_STRING"}}
    return {**env, "PREFECT_HOME": str(home), **settings}


def work_pool_ls(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", "work-pool", "ls"], env=env,
                          capture_output=True, text=True, timeout=SCRIPT_SECONDS)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic bm90LXRoZS1zdHJpbmc="}],
                         ids=["no-auth", "wrong-auth"])
def test_the_api_refuses_a_request_without_its_auth_string(api_url, headers):
    for path in ("/admin/version", "/csrf-token?client=anyone"):
        response = httpx.get(f"{api_url}{path}", headers=headers, timeout=30)
        assert response.status_code == 401, (path, response.text)
    # The health probe answers without it, for load balancers.
    assert httpx.get(f"{api_url}/health", headers=headers, timeout=30).status_code == 200


def test_the_cli_without_the_auth_string_is_refused_and_with_it_is_served(api_url, tmp_path):
    refused = work_pool_ls(client_env(tmp_path, PREFECT_API_URL=api_url))
    assert refused.returncode != 0 and REFUSED.search(refused.stdout + refused.stderr), refused
    served = work_pool_ls(client_env(tmp_path, PREFECT_API_URL=api_url,
                                     PREFECT_API_AUTH_STRING=AUTH_STRING))
    assert served.returncode == 0, served.stdout + served.stderr


def test_a_change_without_a_csrf_token_is_refused_and_cors_admits_only_the_ui(api_url):
    """What a page of another origin could make a logged-in browser send."""
    token = base64.b64encode(AUTH_STRING.encode()).decode()
    response = httpx.post(f"{api_url}/work_pools/filter", json={}, timeout=30,
                          headers={"Authorization": f"Basic {token}"})
    assert response.status_code == 403 and "Missing CSRF token" in response.text, response.text
    for origin, allowed in ((UI_ORIGIN, UI_ORIGIN), ("https://elsewhere.example", None)):
        preflight = httpx.options(f"{api_url}/work_pools/filter", timeout=30, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == allowed, origin


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("url", NETWORK_URLS)
def test_the_scripts_refuse_an_api_beyond_loopback_without_an_auth_string(script, url,
                                                                          tmp_path):
    env = client_env(tmp_path / "home", PREFECT_API_URL=url, GPUS="2")
    started = subprocess.Popen(["bash", str(REPO_ROOT / script)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = started.communicate(timeout=SCRIPT_SECONDS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGKILL)
    assert started.returncode == 1, output
    assert output.strip().splitlines() == [
        f"PREFECT_API_URL {url} is not on loopback and PREFECT_API_AUTH_STRING is not set: "
        f"start the server with PREFECT_SERVER_API_AUTH_STRING and set the same string as "
        f"PREFECT_API_AUTH_STRING here (docs/deployments.md, Security)"], output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"], "a worker started"


@pytest.mark.parametrize("url, auth_string, refused", [
    ("http://127.0.0.1:4200/api", None, False),
    ("http://[::1]:4200/api", None, False),
    ("http://localhost:4200/api", None, False),
    *((url, None, True) for url in NETWORK_URLS),
    *((url, AUTH_STRING, False) for url in NETWORK_URLS),
])
def test_the_api_check_accepts_loopback_or_an_auth_string(url, auth_string, refused, tmp_path):
    auth = {"PREFECT_API_AUTH_STRING": auth_string} if auth_string else {}
    checked = subprocess.run([sys.executable, "deployments/require_api_auth.py"],
                             cwd=REPO_ROOT, env=client_env(tmp_path, PREFECT_API_URL=url, **auth),
                             capture_output=True, text=True, timeout=SCRIPT_SECONDS)
    assert checked.returncode == int(refused), checked.stderr
    assert ("is not on loopback" in checked.stderr) == refused, checked.stderr


def test_the_gpu_workers_script_fans_a_run_out_through_the_authenticated_api(api_url,
                                                                             tmp_path):
    """deployments/start-gpu-workers.sh with GPUS=2 starts the two CPU stand-ins for GPUs;
    the pools, automation and deployment come from setup-pool.sh and `prefect deploy`; every
    request of this process, the scripts, the workers and their flow runs carries the auth
    string and a CSRF token."""
    deployment = deploy_gpu_pool()
    demo = short_demo_config(tmp_path)
    data_dir, workers_dir = tmp_path / "data", tmp_path / "workers"
    workers_dir.mkdir()
    started = subprocess.Popen(["bash", str(REPO_ROOT / "deployments/start-gpu-workers.sh")],
                               cwd=workers_dir, env=prefect_env(GPUS="2"), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = started.communicate(timeout=SCRIPT_SECONDS)
        assert started.returncode == 0, output
        assert sorted(path.name for path in (workers_dir / "logs").glob("*.pid")) == [
            "prefect-gpu-worker-0.pid", "prefect-gpu-worker-1.pid"], output
        wait_for_workers(2)
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGKILL)   # the workers, started in its group

    assert summary["status"] == "published", summary
    rows = published(data_dir, summary)
    assert rows.num_rows == len(set(zip(rows["prompt_id"].to_pylist(),
                                        rows["sample_index"].to_pylist()))) == 12
    children = child_runs(summary["run_id"])
    assert {name: run.state.name for name, run in children.items()} == {
        "r1-0": "Completed", "r1-1": "Completed"}
    assert len(list((data_dir / "shards" / "demo").glob("*.parquet"))) == 6
    for log in workers_dir.glob("*.log"):
        assert not REFUSED.search(log.read_text()), log
