"""Refuses a Prefect API reached over the network without an auth string (exit status 1).

Whoever reaches an unauthenticated Prefect server can run any deployment with any job
variables (a process worker runs the `command` job variable: a shell on every worker, with
the data mount and the model cache), read every log and cancel runs. On loopback only this
host's users reach it; beyond it, the server needs PREFECT_SERVER_API_AUTH_STRING and every
client PREFECT_API_AUTH_STRING (or PREFECT_API_KEY for Prefect Cloud). The URL and the auth
string are read as Prefect reads them: the environment, then the active profile.

    python deployments/require_api_auth.py      # setup-pool.sh and start-gpu-workers.sh run it
"""

from __future__ import annotations

import ipaddress
import sys
from urllib.parse import urlsplit

from prefect.settings import get_current_settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal() -> str | None:
    """Why this host must not talk to its Prefect API as configured; None when it may."""
    api = get_current_settings().api
    if not api.url:
        return None         # no API: Prefect starts a temporary one on this host
    host = urlsplit(api.url).hostname or ""
    has_auth = any(secret is not None and secret.get_secret_value()
                   for secret in (api.auth_string, api.key))
    if is_loopback(host) or has_auth:
        return None
    return (f"PREFECT_API_URL {api.url} is not on loopback and PREFECT_API_AUTH_STRING is "
            f"not set: start the server with PREFECT_SERVER_API_AUTH_STRING and set the same "
            f"string as PREFECT_API_AUTH_STRING here (docs/deployments.md, Security)")


if __name__ == "__main__":
    sys.exit(refusal())
