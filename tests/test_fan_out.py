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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
from prefect.exceptions import ParameterTypeError
from pydantic import TypeAdapter, ValidationError

from flows.distill import RunFailed, distill
from flows.shard_worker import generate_shards
from tasks import fan_out
from tasks.config import REPO_ROOT, load_dataset_config
from tasks.fan_out import RunId, WorkOrder, write_work_order
from tasks.generation import resolve_models
from tasks.layout import DataDir
from tasks.ledger import RunLedger
from tasks.lineage import describe_generation
from tasks.planning import FIRST_ROUND, split_into_shards
from tasks.staging import StagedPrompt
from prefect_servers import (GPU_POOL, RUN_DATE, SHARD_SIZE, child_runs,
                             deploy_gpu_pool, prefect_env, prefect_server, published,
                             short_demo_config, wait_for_workers)

UNRESPONSIVE_AFTER = 60        # a share silent this long is crashed (its deployment's
                               # heartbeat is every 30 s, deployments/prefect.yaml)
BUILDS_REPORTED = re.compile(r"shards of run \S+ done on (\d+) engine pair")  # shard_worker
RUN_ID = "demo-2026-03-01-0123abcd"   # a run id as tasks/ledger.RunLedger makes it
SHARD_KEY = "0123456789abcdef0123"    # a key as tasks/planning.split_into_shards makes it


@pytest.fixture(scope="module")
def api_url(tiny_pair, tmp_path_factory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_TINY_MODELS_DIR", str(Path(tiny_pair[0]).parent))
        with prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
            yield url


@pytest.fixture(scope="module")
def deployment(api_url) -> str:
    """The pools, the automation that crashes silent shares (after 60 s here) and the GPU
    workers' deployment, made by the project's own scripts."""
    return deploy_gpu_pool(DISTILL_UNRESPONSIVE_AFTER_SECONDS=str(UNRESPONSIVE_AFTER))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return short_demo_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def one_process(api_url, demo, tmp_path_factory) -> pa.Table:
    """What one engine pair in one process publishes for the date."""
    data_dir = tmp_path_factory.mktemp("one-process")
    summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                      data_dir=str(data_dir))
    return published(data_dir, summary)


@contextmanager
def workers(logs: Path, crash_first_at: str | None = None) -> Iterator[None]:
    """Two workers on distill-gpu, each one flow run at a time; the first one's flow runs
    die (or its machine stops answering) at `crash_first_at` (a crash point,
    tasks/faults.py) if given."""
    processes = []
    for index in range(2):
        extra = {"DISTILL_CRASH_AT": crash_first_at} if crash_first_at and index == 0 else {}
        log = (logs / f"worker-{index}.log").open("w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", GPU_POOL,
             "--limit", "1", "--name", f"cpu-worker-{index}"],
            cwd=REPO_ROOT, env=prefect_env(**extra), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_for_workers(2)
        yield
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
    with workers(tmp_path, crash_first_at="shard-write:2"):
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment)

    assert summary["status"] == "published", summary
    rows = published(data_dir, summary)
    assert rows.equals(one_process), "the fanned-out run published other rows"
    assert rows.num_rows == len(set(zip(rows["prompt_id"].to_pylist(),
                                        rows["sample_index"].to_pylist()))) == 12
    children = child_runs(summary["run_id"])
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
    with workers(tmp_path, crash_first_at="shard-write:2:machine"):
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment)

    assert summary["status"] == "published", summary
    assert published(data_dir, summary).equals(one_process), "other rows were published"
    children = child_runs(summary["run_id"])
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
    state = generate_shards(str(tmp_path), RUN_ID, [SHARD_KEY], return_state=True)
    assert state.is_cancelled()
    assert f"run {RUN_ID} has ended" in state.message and "nothing to generate" in state.message
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("flow_run_id", ["9f1c2b3a-5d6e-4f70-8a91-b2c3d4e5f607", "local"])
def test_the_run_ids_the_ledger_makes_are_ones_a_share_accepts(tmp_path, flow_run_id):
    ledger = RunLedger(DataDir(tmp_path), load_dataset_config("demo"), RUN_DATE, flow_run_id)
    assert TypeAdapter(RunId).validate_python(ledger.run_id) == ledger.run_id


@pytest.mark.parametrize("field, run_id, shard_key", [
    ("run_id", "../outside/evil", SHARD_KEY),
    ("run_id", "demo-2026-03-01-local/../../../outside/evil", SHARD_KEY),
    ("shard_keys.0", RUN_ID, f"../../published/dataset=demo/run_date={RUN_DATE}/data"),
    ("shard_keys.0", RUN_ID, SHARD_KEY.upper()),
])
def test_a_share_refuses_a_run_id_or_shard_key_not_of_its_format_naming_it(
        api_url, tmp_path, field, run_id, shard_key):
    """The work order `work/<run id>.json` and the shard file `shards/<dataset>/<key>.parquet`
    are named by these: `../outside/evil` would read outside/evil.json."""
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.json").write_text("not a work order")
    with pytest.raises(ParameterTypeError,
                       match=rf"\n - {re.escape(field)}: String should match pattern"):
        generate_shards(str(data_dir), run_id, [shard_key])
    assert not data_dir.exists()
    assert [path.name for path in outside.iterdir()] == ["evil.json"]


def test_a_work_order_whose_shard_key_is_a_path_is_refused_naming_the_field(api_url, tmp_path):
    """A key of the work order on the shared mount names the file its shard is written to:
    one that climbs into published/ would overwrite a partition."""
    data = DataDir(tmp_path / "data")
    config = load_dataset_config("demo")
    generation = describe_generation(config, resolve_models(config))
    prompt = StagedPrompt(1, "p1", "c1", "teacher prompt", "theta prompt", {"question": "q"})
    shard, = split_into_shards([prompt], generation.key, FIRST_ROUND, 1, SHARD_SIZE)
    order = write_work_order(WorkOrder(config, generation, RUN_ID, (shard,)), data)
    partition = data.partition(config.name, generation.key, RUN_DATE)
    partition.parent.mkdir(parents=True)
    partition.write_bytes(b"published rows")
    climbing = f"../../{partition.relative_to(data.root).with_suffix('')}"
    assert data.shard(config.name, climbing).resolve() == partition.resolve()
    assert order.read_text().count(f'"{shard.key}"') == 1
    order.write_text(order.read_text().replace(f'"{shard.key}"', f'"{climbing}"'))

    with pytest.raises(ValidationError, match=r"\nshards\.0\.key\n +String should match"):
        generate_shards(str(data.root), RUN_ID, [shard.key])
    assert partition.read_bytes() == b"published rows"
    assert not data.shards.exists()
