"""A run's shards fanned out over GPU workers of a Prefect work pool (in this process instead:
`tasks.generation.generate_in_process`).

`fan_out` names the deployment of flows/shard_worker.py; every GPU has one
Prefect worker pinned to it (`CUDA_VISIBLE_DEVICES=<i> prefect worker start --pool <pool>
--limit 1`), so a GPU runs one child flow run, hence one engine pair, at a time, whatever
runs are queued. The parent:
1. writes the run's work order (config, generation, shards) on the storage the workers share;
2. deals the shards not generated yet round-robin into one share per worker and starts a
   child flow run of the deployment for each share (`run_deployment`, linked as subflows);
3. polls the children, filling the progress artifact as shard files appear;
4. deals the shards of children that crashed (their process died: killed, out of memory, a
   lost machine once Prefect marks it crashed) over new children, up to `MAX_ROUNDS` rounds;
   a shard a child failed on keeps that child's error (a rerun of the date redoes it);
5. removes the work order, however the rounds end; a share still queued then finds none
   and ends Cancelled without building an engine (a parent killed outright cannot remove it:
   its shares still generate, and the date's next run reuses their content-named files).
A run that finds no worker online fails at once, unless `workers` gives the number of shares
(its shares then wait as below). A share waits in the pool while any worker is online
(another run's share may hold the GPU), and is cancelled after `OFFLINE_GRACE_SECONDS`
without one.
A child builds its engine pair once, for its first shard, and keeps it for the rest. Shard
files are written atomically and named by content, and a sample's draws come from the round's
seed and its own key (`tasks.shard_rows.row_key`), so neither the number of GPUs nor which
worker wrote a shard changes a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NamedTuple

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, WorkerStatus
from prefect.deployments import run_deployment
from prefect.states import Cancelled
from pydantic import StringConstraints, TypeAdapter

from tasks.atomic_files import write_text_atomically
from tasks.config import DatasetConfig
from tasks.generation import Outcome, ShardOutcome, progress_bar
from tasks.layout import DataDir
from tasks.lineage import Generation
from tasks.planning import Shard, ShardKey

logger = logging.getLogger(__name__)

MAX_ROUNDS = 2
POLL_SECONDS = 2.0
OFFLINE_GRACE_SECONDS = 300.0

RunId = Annotated[str, StringConstraints(
    pattern=r"^[a-z0-9_]+-[0-9]{4}-[0-9]{2}-[0-9]{2}-[a-z0-9]{1,8}$")]
"""A run id as tasks/ledger.RunLedger makes it: the dataset's name, the run date and the
first 8 characters of the flow run's id ("local" outside Prefect). It names the run's work
order, so one from outside (a child flow run's parameters) is held to it."""


class ShardNotGenerated(RuntimeError):
    """The child flow run that had the shard ended without writing it."""


class NoWorkers(RuntimeError):
    """No worker of the fan-out deployment's pool is online to take the shares."""


@dataclass(frozen=True)
class WorkOrder:
    """What a child flow run needs to generate shards of a run, read from shared storage."""

    config: DatasetConfig
    generation: Generation
    run_id: RunId
    shards: tuple[Shard, ...]

    def select(self, keys: list[ShardKey]) -> list[Shard]:
        by_key = {shard.key: shard for shard in self.shards}
        missing = [key for key in keys if key not in by_key]
        if missing:
            raise KeyError(f"shards {missing} are not in the work order of run {self.run_id}")
        return [by_key[key] for key in keys]


_WORK_ORDER = TypeAdapter(WorkOrder)


def write_work_order(order: WorkOrder, data: DataDir) -> Path:
    path = data.work_order(order.run_id)
    write_text_atomically(_WORK_ORDER.dump_json(order, indent=1).decode(), path, "work-order")
    return path


def read_work_order(data: DataDir, run_id: RunId) -> WorkOrder:
    """The work order of `run_id`, refused (naming the field) unless every shard key, the
    run id and the config have their formats: its keys become file names."""
    return _WORK_ORDER.validate_json(data.work_order(run_id).read_bytes())


def generate_on_workers(shards: list[Shard], config: DatasetConfig, generation: Generation,
                        run_id: str, data: DataDir, deployment: str, workers: int | None
                        ) -> list[Outcome]:
    """Every shard through child flow runs of `deployment`, one share per worker (`workers`,
    default: the workers online in the deployment's pool); outcomes in shard order."""
    paths = {shard.key: data.shard(config.name, shard.key) for shard in shards}
    reused = {key for key, path in paths.items() if path.exists()}
    pool = work_pool_of(deployment)
    shares = workers or online_workers(pool)
    if not shares:
        raise NoWorkers(f"fan_out {deployment}: no worker is online in work pool {pool}; start "
                        f"one per GPU (deployments/start-gpu-workers.sh)")
    order = write_work_order(WorkOrder(config, generation, run_id, tuple(shards)), data)
    progress = progress_bar(run_id)
    errors: dict[str, str] = {}
    pending = [shard for shard in shards if shard.key not in reused]
    try:
        for round_number in range(1, MAX_ROUNDS + 1):
            if not pending:
                break
            children = _start_children(deployment, pending, shares, data, run_id, round_number)
            finished = _wait(children, pool, paths, progress)
            crashed = _record_unwritten(finished, paths, errors)
            pending = [shard for shard in pending if shard.key in crashed]
            if pending and round_number < MAX_ROUNDS:
                logger.warning("%d shards lost with crashed workers; dealing them out again",
                               len(pending))
    finally:
        order.unlink(missing_ok=True)
    return [ShardOutcome(shard, str(paths[shard.key]), reused=shard.key in reused)
            if paths[shard.key].exists() else ShardNotGenerated(errors[shard.key])
            for shard in shards]


def work_pool_of(deployment: str) -> str:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(deployment).work_pool_name


def online_workers(pool: str) -> int:
    """Workers of `pool` that Prefect counts online (they sent a heartbeat lately)."""
    with get_client(sync_client=True) as client:
        online = _count_online(client, pool)
    logger.info("%d workers online in work pool %s", online, pool)
    return online


def _count_online(client: SyncPrefectClient, pool: str) -> int:
    return sum(worker.status == WorkerStatus.ONLINE
               for worker in client.read_workers_for_work_pool(pool))


class Child(NamedTuple):
    run: FlowRun              # the latest state read from the API
    shard_keys: list[str]


def _start_children(deployment: str, shards: list[Shard], shares: int, data: DataDir,
                    run_id: str, round_number: int) -> list[Child]:
    """One child flow run per non-empty share."""
    children = []
    for index in range(shares):
        keys = [shard.key for shard in shards[index::shares]]
        if keys:
            run = run_deployment(
                deployment, timeout=0, flow_run_name=f"{run_id}-r{round_number}-{index}",
                parameters={"data_dir": str(data.root), "run_id": run_id, "shard_keys": keys})
            children.append(Child(run, keys))
    logger.info("round %d: %d shards over %d child flow runs of %s", round_number,
                len(shards), len(children), deployment)
    return children


def _wait(children: list[Child], pool: str, paths: dict[str, Path],
          progress: Callable[[int, int], None]) -> list[Child]:
    """Poll until every child's state is final. Children waiting for a worker wait as long
    as the pool has one online (another run's share may hold the GPU); after
    `OFFLINE_GRACE_SECONDS` without any, they are cancelled."""
    last_online = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            children = [Child(client.read_flow_run(child.run.id), child.shard_keys)
                        for child in children]
            progress(sum(path.exists() for path in paths.values()), len(paths))
            if all(child.run.state.is_final() for child in children):
                return children
            waiting = [child.run for child in children
                       if child.run.state.is_scheduled() or child.run.state.is_pending()]
            if waiting and _count_online(client, pool):
                last_online = time.monotonic()
            elif waiting and time.monotonic() - last_online > OFFLINE_GRACE_SECONDS:
                for run in waiting:
                    client.set_flow_run_state(run.id, Cancelled(
                        message=f"no worker online in work pool {pool} for "
                                f"{OFFLINE_GRACE_SECONDS:.0f} s"), force=True)
            time.sleep(POLL_SECONDS)


def _record_unwritten(children: list[Child], paths: dict[str, Path], errors: dict[str, str]
                      ) -> set[str]:
    """Record in `errors` why each unwritten shard is missing; return those of children that
    crashed (their process died), which may be dealt out again."""
    crashed = set()
    for run, keys in children:
        unwritten = [key for key in keys if not paths[key].exists()]
        if not unwritten:
            continue
        # The child's name goes to the log, not the error, so that shares that ended the
        # same way make one problem in the run's message (tasks/settling.run_problems).
        message = f"its GPU share ended {run.state.name}: {run.state.message or 'no message'}"
        logger.warning("child flow run %s left %d shards unwritten: %s", run.name,
                       len(unwritten), message)
        for key in unwritten:
            errors[key] = message
            if run.state.is_crashed():
                crashed.add(key)
    return crashed
