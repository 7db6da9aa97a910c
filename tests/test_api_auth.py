"""The several-machine path's API: a real `prefect server start` with an auth string, CSRF
protection and CORS limited to the UI's origin, set as docs/deployments.md (Security) says, and
the project's scripts, which refuse an API beyond loopback without an auth string. The two GPU
workers deployments/start-gpu-workers.sh starts, fanning a run out through such an API, are
tests/test_fan_out.py's (its server has the same settings): this file starts no worker.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefect_servers import (AUTH_STRING, REFUSED, SCRIPT_SECONDS, SECURED, UI_ORIGIN,
                             prefect_env, prefect_server)
from tasks.config import REPO_ROOT

SCRIPTS = ["deployments/setup-pool.sh", "deployments/start-gpu-workers.sh"]
NETWORK_URLS = ["http://10.0.0.5:4200/api", "http://[fd00::5]:4200/api",
                "https://localhost.internal.example/api"]


@pytest.fixture(scope="module")
def api_url(tmp_path_factory) -> Iterator[str]:
    with prefect_server(tmp_path_factory.mktemp("prefect-home"), auth_string=AUTH_STRING,
                        **SECURED) as url:
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
