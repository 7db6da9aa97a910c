"""A model that cannot be loaded fails the run once, in seconds, with one message.

Real flow runs under Prefect's test harness: the hub is made unreachable on purpose
(HF_HUB_OFFLINE, or an endpoint nobody listens on), so the tests do not depend on the
machine's network. "In seconds" is checked by what takes time, not by a clock (which a
loaded machine stretches): no engine is built, no shard planned, the hub asked at most once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx2
import huggingface_hub.constants
import pytest
from huggingface_hub import set_client_factory
from huggingface_hub.utils._http import default_client_factory
from prefect.testing.utilities import prefect_test_harness

import sampler.models
from flows.distill import distill
from sampler.errors import ConfigError
from tasks.config import DATASETS_DIR
from tasks.engines import ENGINES, EngineBuildError, EngineCache
from tasks.sql import read_catalog

RUN_DATE = date(2026, 5, 1)
HUB_NAME = "no-such-org/no-such-model-15"


@pytest.fixture(scope="module", autouse=True)
def prefect_backend():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def hub_requests() -> Iterator[list[str]]:
    """The URLs huggingface_hub requests, recorded by a hook on its own client."""
    requests: list[str] = []

    def record(request: httpx2.Request) -> None:
        requests.append(str(request.url))

    def recording_client() -> httpx2.Client:
        client = default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks["request"], record]}
        return client

    set_client_factory(recording_client)
    yield requests
    set_client_factory(default_client_factory)


def tokenizer_without_weights(tiny_pair, tmp_path: Path) -> str:
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_pair[1], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(folder)


def torn_weights(tiny_pair, tmp_path: Path) -> str:
    """A copy cut short, as an interrupted download leaves it."""
    folder = tmp_path / "torn"
    shutil.copytree(tiny_pair[1], folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return str(folder)


CASES = {  # id: (field, name given for it, environment)
    "hub-offline": ("models.teacher", lambda pair, tmp: HUB_NAME, {"HF_HUB_OFFLINE": "1"}),
    "hub-unreachable": ("models.teacher", lambda pair, tmp: HUB_NAME,
                        {"ENDPOINT": "http://127.0.0.1:9"}),
    "misspelt-path": ("models.theta", lambda pair, tmp: f"{pair[1]}-misspelt", {}),
    "no-weights": ("models.theta", tokenizer_without_weights, {}),
    "torn-weights": ("models.theta", torn_weights, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_an_unloadable_model_fails_the_run_before_any_shard(case, tiny_pair, tmp_path,
                                                            monkeypatch, hub_requests):
    field, make_name, environment = CASES[case]
    name = make_name(tiny_pair, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if "HF_HUB_OFFLINE" in environment:
        monkeypatch.setenv("HF_HUB_OFFLINE", environment["HF_HUB_OFFLINE"])
    if "ENDPOINT" in environment:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", environment["ENDPOINT"])
    role = field.split(".")[1]
    text = (DATASETS_DIR / "demo.yaml").read_text().replace(f"{role}: tiny:{role}",
                                                            f"{role}: {name}")
    config = tmp_path / f"{case}.yaml"
    config.write_text(text.replace("name: demo", "name: unloadable"))
    attempts = []
    real_resolve = sampler.models.resolve_model

    def counted(model: str, model_field: str, chat_template: bool = True):
        attempts.append(model_field)
        return real_resolve(model, model_field, chat_template)

    monkeypatch.setattr(sampler.models, "resolve_model", counted)
    data_dir = tmp_path / "data"
    builds = ENGINES.builds
    with pytest.raises(ConfigError) as raised:
        distill(dataset=str(config), run_date=RUN_DATE, shard_size=4, data_dir=str(data_dir))
    message = str(raised.value)
    assert message.startswith(f"{field}: ") and repr(name) in message, message
    assert attempts.count(field) == 1, attempts
    # huggingface_hub fetches its registry of coding agents once a day: no request of ours
    asked = [url for url in hub_requests if not url.endswith("/api/agent-harnesses")]
    assert len(asked) == (1 if "ENDPOINT" in environment else 0), hub_requests
    assert ENGINES.builds == builds
    assert not (data_dir / "shards").exists() and not (data_dir / "published").exists()
    catalog = data_dir / "catalog.duckdb"
    assert read_catalog(catalog, "SELECT count(*) FROM shards") == [(0,)]
    assert read_catalog(catalog, "SELECT count(*) FROM prompts") == [(0,)]
    runs = read_catalog(catalog, "SELECT status, message FROM runs")
    assert runs == [("failed", f"ConfigError: {message}"[:2000])], runs


def test_a_pair_that_cannot_be_built_is_built_once():
    cache = EngineCache()
    builds = []

    def broken_weights():
        builds.append(1)
        raise OSError("model.safetensors: header too large")

    for _ in range(3):
        with pytest.raises(EngineBuildError, match="models.theta 'x': cannot build the engine "
                                                   "pair: OSError: model.safetensors"):
            cache.run("key", broken_weights, lambda pair: pair, "models.theta 'x'")
    assert len(builds) == 1
