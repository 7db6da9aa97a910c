"""Shards fanned out over two Prefect process workers, the CPU stand-ins for two GPUs, through
an authenticated API (issue 24): a real server with an auth string, CSRF protection and CORS
limited to the UI's origin (tests/prefect_servers.py), so every request of this process, the
scripts, the workers and their flow runs carries the auth string and a CSRF token.

The workers are real `prefect worker start --limit 1` processes (as deployments/
start-gpu-workers.sh starts them; one test runs that script) on the pool that
deployments/setup-pool.sh creates, running the `generate-shards/gpu` deployment that
`prefect deploy` reads from deployments/prefect.yaml; the distill flow starts their child runs
with `run_deployment`. A share's crash is real: a crash point kills the process of the child
flow run `r1-0` while it writes a shard file, whichever worker runs it (tasks/faults.py), so no
assertion depends on which worker takes which share or when.
"""

from __future__ import annotations

import contextlib
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
from prefect.deployments import run_deployment
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
from prefect_servers import (AUTH_STRING, GPU_POOL, REFUSED, RUN_DATE, SCRIPT_SECONDS,
                             SECURED, SHARD_SIZE, child_runs, deploy_gpu_pool, prefect_env,
                             prefect_server, published, short_demo_config, wait_for_workers)

UNRESPONSIVE_AFTER = 90        # a share silent this long is crashed: the default of
                               # deployments/crash_unresponsive_runs.py, three 30 s heartbeats
CRASHED_SHARE = "r1-0"         # round 1's first share: shards 0, 2 and 4 of the 6
# It dies writing its 2nd shard: shard 0 is written, 2 and 4 are dealt out again in round 2.
SHARE_STATES = {"r1-0": "Crashed", "r1-1": "Completed", "r2-0": "Completed",
                "r2-1": "Completed"}
SHARE_SECONDS = 300            # a share's process starting on a loaded host; the wait ends
                               # when it does
BUILDS_REPORTED = re.compile(r"shards of run \S+ done on (\d+) engine pair")  # shard_worker
RUN_ID = "demo-2026-03-01-0123abcd"   # a run id as tasks/ledger.RunLedger makes it
SHARD_KEY = "0123456789abcdef0123"    # a key as tasks/planning.split_into_shards makes it


@pytest.fixture(scope="module")
def api_url(tiny_pair, tmp_path_factory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_TINY_MODELS_DIR", str(Path(tiny_pair[0]).parent))
        with prefect_server(tmp_path_factory.mktemp("prefect-home"), auth_string=AUTH_STRING,
                            **SECURED) as url:
            yield url


@pytest.fixture(scope="module")
def deployment(api_url) -> str:
    """The pools, the automation that crashes silent shares and the GPU workers' deployment,
    made by the project's own scripts."""
    return deploy_gpu_pool()


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
def gpu_workers_script(logs: Path) -> Iterator[None]:
    """The two workers deployments/start-gpu-workers.sh starts with GPUS=2 (one process group,
    their logs and pid files in `logs`), online; killed at the end."""
    logs.mkdir()
    script = subprocess.Popen(
        ["bash", str(REPO_ROOT / "deployments/start-gpu-workers.sh")], cwd=logs, text=True,
        env=prefect_env(GPUS="2", DISTILL_LOG_DIR=str(logs)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = script.communicate(timeout=SCRIPT_SECONDS)
        assert script.returncode == 0, output
        assert sorted(path.name for path in logs.glob("*.pid")) == [
            "prefect-gpu-worker-0.pid", "prefect-gpu-worker-1.pid"], output
        wait_for_workers(2)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)   # the workers, started in its group


@contextmanager
def workers(logs: Path, crash_at: str) -> Iterator[None]:
    """Two workers on distill-gpu, each one flow run at a time and in a process group of its
    own (two machines: one that freezes freezes one worker), their flow runs dying (or their
    machine stopping) at crash point `crash_at`. Started as start-gpu-workers.sh starts one,
    without its OMP_NUM_THREADS (cores / GPUs): the CPU engines' float sums, hence the rows'
    log-probabilities, change with the thread count, and these rows are compared, bit for bit,
    with those of the one-process run beside them."""
    processes = []
    for index in range(2):
        log = (logs / f"worker-{index}.log").open("w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", GPU_POOL,
             "--limit", "1", "--name", f"cpu-worker-{index}"],
            cwd=REPO_ROOT, env=prefect_env(DISTILL_CRASH_AT=crash_at), stdout=log,
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


def test_the_gpu_workers_script_starts_two_workers_that_take_a_share(
        api_url, deployment, tmp_path):
    """deployments/start-gpu-workers.sh with GPUS=2: both workers come online through the
    authenticated API and one runs a share; its run has ended, so it is Cancelled without an
    engine built (the fan-outs below build them)."""
    with gpu_workers_script(tmp_path / "logs"):
        share = run_deployment(deployment, timeout=SHARE_SECONDS, parameters={
            "data_dir": str(tmp_path / "data"), "run_id": RUN_ID, "shard_keys": [SHARD_KEY]})
    assert share.state.is_cancelled(), share.state
    assert f"run {RUN_ID} has ended" in share.state.message
    assert not (tmp_path / "data" / "shards").exists()
    for log in (tmp_path / "logs").glob("*.log"):
        assert not REFUSED.search(log.read_text()), log


def test_two_workers_share_a_run_and_a_share_killed_mid_shard_loses_nothing(
        api_url, deployment, demo, one_process, tmp_path):
    """Round 1 deals the 6 shards into 2 shares of 3; share r1-0's process dies writing its
    2nd shard, and round 2 deals its 2 unwritten shards over 2 new shares. Which worker runs
    which share is timing's business: nothing here depends on it."""
    data_dir = tmp_path / "data"
    with workers(tmp_path, crash_at=f"shard-write:2:share={CRASHED_SHARE}"):
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment, workers=2)

    assert summary["status"] == "published", summary
    rows = published(data_dir, summary)
    assert rows.equals(one_process), "the fanned-out run published other rows"
    assert rows.num_rows == len(set(zip(rows["prompt_id"].to_pylist(),
                                        rows["sample_index"].to_pylist()))) == 12
    assert {name: run.state.name for name, run in child_runs(summary["run_id"]).items()
            } == SHARE_STATES
    assert len(list((data_dir / "shards" / "demo").glob("*.parquet"))) == 6
    left = list((data_dir / "shards").rglob(".*.tmp"))
    assert len(left) == 1, f"expected the killed writer's temporary file alone: {left}"
    worker_logs = [log.read_text() for log in tmp_path.glob("worker-*.log")]
    builds = [int(n) for log in worker_logs for n in BUILDS_REPORTED.findall(log)]
    assert builds == [1, 1, 1], "each share that finished built one pair, not one per shard"
    assert not any(REFUSED.search(log) for log in worker_logs), "a request was refused"
    assert not (data_dir / "work").exists() or not any((data_dir / "work").iterdir())


def test_a_gpu_machine_that_stops_answering_mid_shard_loses_nothing(
        api_url, deployment, demo, one_process, tmp_path):
    """Share r1-0's worker and flow run freeze while it writes its 2nd shard (SIGSTOP of their
    process group, one of two machines): nothing reports the share's end, so the automation
    made by setup-pool.sh crashes it once its heartbeats stop, and round 2 deals its 2
    unwritten shards out again; the machine still answering runs them."""
    data_dir = tmp_path / "data"
    with workers(tmp_path, f"shard-write:2:machine:share={CRASHED_SHARE}"):
        summary = distill(dataset=demo, run_date=RUN_DATE, shard_size=SHARD_SIZE,
                          data_dir=str(data_dir), fan_out=deployment, workers=2)

    assert summary["status"] == "published", summary
    assert published(data_dir, summary).equals(one_process), "other rows were published"
    children = child_runs(summary["run_id"])
    assert {name: run.state.name for name, run in children.items()} == SHARE_STATES
    assert children[CRASHED_SHARE].state.message == (
        f"no heartbeat for {UNRESPONSIVE_AFTER} s: its machine stopped answering")
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
