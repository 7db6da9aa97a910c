"""Shards fanned out over two Prefect process workers, the CPU stand-ins for two GPUs.

The workers are real `prefect worker start --limit 1` processes on the pool that
deployments/setup-pool.sh creates, running the `generate-shards/gpu` deployment that
`prefect deploy` reads from deployments/prefect.yaml; the distill flow starts their child runs
with `run_deployment`. A worker's crash is real: a crash point kills its flow run's process
with SIGKILL while a shard file is written (tasks/faults.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.distill import RunFailed, distill
from flows.shard_worker import generate_shards
from tasks.config import DATASETS_DIR, REPO_ROOT
from tasks import fan_out
from tasks.fan_out import online_workers

RUN_DATE = date(2026, 3, 1)
SHARD_SIZE = 2                 # the demo's 12 prompts in 6 shards, 3 to each worker
DEPLOYMENT = "generate-shards/gpu"
UNRESPONSIVE_AFTER = 60        # a share silent this long is crashed (its deployment's
                               # heartbeat is every 30 s, deployments/prefect.yaml)
BUILDS_REPORTED = re.compile(r"shards of run \S+ done on (\d+) engine pair")  # shard_worker
PROVENANCE = {"generated_run_id", "generated_at", "published_run_id", "published_at",
              "generated_dirty"}


@pytest.fixture(scope="module")
def api_url(tiny_pair) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_TINY_MODELS_DIR", str(Path(tiny_pair[0]).parent))
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()


def prefect_env(api_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "DISTILL_CRASH_AT"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PATH": path, "PREFECT_API_URL": api_url, "DISTILL_REPO": str(REPO_ROOT),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def deployment(api_url) -> str:
    """The pools, the automation that crashes silent shares (after 60 s here) and the GPU
    workers' deployment, made by the project's own scripts."""
    env = prefect_env(api_url, DISTILL_UNRESPONSIVE_AFTER_SECONDS=str(UNRESPONSIVE_AFTER))
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    """The demo's config with 32-token samples (it draws 256), kept although they stop at
    max_tokens: these tests are about workers."""
    text = (DATASETS_DIR / "demo.yaml").read_text()
    assert "max_tokens: 256" in text and "keep_truncated: false" in text
    path = tmp_path_factory.mktemp("config") / "demo.yaml"
    path.write_text(text.replace("max_tokens: 256", "max_tokens: 32").replace(
        "keep_truncated: false", "keep_truncated: true"))
    return str(path)


@pytest.fixture(scope="module")
def one_process(api_url, demo, tmp_path_factory) -> pa.Table:
    """What one engine pair in one process publishes for the date."""
    data_dir = tmp_path_factory.mktemp("one-process")
    summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                      data_dir=str(data_dir))
    return published(data_dir, summary)


@contextmanager
def workers(api_url: str, logs: Path, crash_first_at: str | None = None) -> Iterator[None]:
    """Two workers on distill-gpu, each one flow run at a time; the first one's flow runs
    die (or its machine stops answering) at `crash_first_at` (a crash point,
    tasks/faults.py) if given."""
    processes = []
    for index in range(2):
        extra = {"DISTILL_CRASH_AT": crash_first_at} if crash_first_at and index == 0 else {}
        log = (logs / f"worker-{index}.log").open("w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "distill-gpu",
             "--limit", "1", "--name", f"cpu-worker-{index}"],
            cwd=REPO_ROOT, env=prefect_env(api_url, **extra), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 120
        while online_workers("distill-gpu") < 2:
            assert time.monotonic() < deadline, "the two workers did not come online"
            time.sleep(1)
        yield
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def published(data_dir: Path, summary: dict) -> pa.Table:
    path = (data_dir / "published" / "dataset=demo" / f"generation={summary['generation']}"
            / f"run_date={RUN_DATE}" / "data.parquet")
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.column_names if c in PROVENANCE]).sort_by(
        [("prompt_id", "ascending"), ("sample_index", "ascending")])


def child_runs(run_id: str) -> list[FlowRun]:
    """The GPU shares of a run: child flow runs named after the run (tasks/fan_out.py)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=run_id)))


def test_no_worker_online_fails_the_run_at_once_naming_the_pool(deployment, demo, tmp_path):
    with pytest.raises(fan_out.NoWorkers, match="no worker is online in work pool distill-gpu"):
        distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                data_dir=str(tmp_path), fan_out=deployment)
    assert not (tmp_path / "shards").exists()


def test_shares_no_worker_takes_are_cancelled_and_the_run_fails_naming_why(
        deployment, demo, tmp_path, monkeypatch):
    monkeypatch.setattr(fan_out, "OFFLINE_GRACE_SECONDS", 3.0)
    with pytest.raises(RunFailed, match="ended Cancelled: no worker online in work pool "
                                        "distill-gpu for 3 s"):
        distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                data_dir=str(tmp_path), fan_out=deployment, workers=2)
    assert not list((tmp_path / "shards").rglob("*.parquet"))


def test_two_workers_share_a_run_and_one_killed_mid_shard_loses_nothing(
        api_url, deployment, demo, one_process, tmp_path):
    """Round 1 gives each worker online 3 shards; the first worker's process dies writing its
    2nd, round 2 deals the 2 shards it left over both workers."""
    data_dir = tmp_path / "data"
    with workers(api_url, tmp_path, crash_first_at="shard-write:2"):
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment)

    assert summary["status"] == "published", summary
    rows = published(data_dir, summary)
    assert rows.equals(one_process), "the fanned-out run published other rows"
    assert rows.num_rows == len(set(zip(rows["prompt_id"].to_pylist(),
                                        rows["sample_index"].to_pylist()))) == 12
    children = {run.name.removeprefix(summary["run_id"] + "-"): run
                for run in child_runs(summary["run_id"])}
    first_round = [run for name, run in children.items() if name.startswith("r1-")]
    assert sorted(run.state.name for run in first_round) == ["Completed", "Crashed"]
    early, late = sorted(first_round, key=lambda run: run.start_time)
    assert late.start_time < early.end_time, "the two shares did not run at the same time"
    second_round = [run for name, run in children.items() if name.startswith("r2-")]
    assert [run.state.name for run in second_round] == ["Completed", "Completed"]
    assert len(list((data_dir / "shards" / "demo").glob("*.parquet"))) == 6
    left = list((data_dir / "shards").rglob(".*.tmp"))
    assert len(left) == 1, f"expected the killed writer's temporary file alone: {left}"
    builds = [int(n) for log in tmp_path.glob("worker-*.log")
              for n in BUILDS_REPORTED.findall(log.read_text())]
    assert builds == [1, 1, 1], "each child that finished built one pair, not one per shard"
    assert not (data_dir / "work").exists() or not any((data_dir / "work").iterdir())


def test_a_gpu_machine_that_stops_answering_mid_shard_loses_nothing(
        api_url, deployment, demo, one_process, tmp_path):
    """The first worker and its flow run freeze while it writes its 2nd shard (SIGSTOP of
    their process group): nothing reports the share's end, so the automation made by
    setup-pool.sh crashes it once its heartbeats stop, and round 2 deals its 2 unwritten
    shards out again; the worker still answering runs them."""
    data_dir = tmp_path / "data"
    with workers(api_url, tmp_path, crash_first_at="shard-write:2:machine"):
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment)

    assert summary["status"] == "published", summary
    assert published(data_dir, summary).equals(one_process), "other rows were published"
    children = {run.name.removeprefix(summary["run_id"] + "-"): run
                for run in child_runs(summary["run_id"])}
    first_round = sorted((run for name, run in children.items() if name.startswith("r1-")),
                         key=lambda run: run.state.name)
    assert [run.state.name for run in first_round] == ["Completed", "Crashed"]
    assert first_round[1].state.message == (f"no heartbeat for {UNRESPONSIVE_AFTER} s: its "
                                            "machine stopped answering")
    second_round = [run for name, run in children.items() if name.startswith("r2-")]
    assert [run.state.name for run in second_round] == ["Completed", "Completed"]
    assert len(list((data_dir / "shards" / "demo").glob("*.parquet"))) == 6


def test_a_share_that_starts_after_its_run_ended_is_cancelled_saying_so(api_url, tmp_path):
    """Its run ended and removed the work order: no engine is built, nothing is written."""
    state = generate_shards(str(tmp_path), "ended-run", ["a-shard"], return_state=True)
    assert state.is_cancelled()
    assert "run ended-run has ended" in state.message and "nothing to generate" in state.message
    assert not (tmp_path / "shards").exists()
