"""Shards generated in this process, or fanned out over GPU workers of a Prefect work pool.

In this process (the default): the shards go through `generate_shard` on one engine pair,
one at a time (tasks/engines.py).

Over GPU workers (`fan_out` names the deployment of flows/shard_worker.py): every GPU has one
Prefect worker pinned to it (`CUDA_VISIBLE_DEVICES=<i> prefect worker start --pool <pool>
--limit 1`), so a GPU runs one child flow run, hence one engine pair, at a time, whatever
runs are queued. The parent:
1. writes the run's work order (config, generation, shards) on the storage the workers share;
2. deals the shards not generated yet round-robin into one share per worker and starts a
   child flow run of the deployment for each share (`run_deployment`, linked as subflows);
3. polls the children, filling the progress artifact as shard files appear;
4. deals the shards of children that crashed (their process died: killed, out of memory, a
   lost machine once Prefect marks it crashed) over new children, up to `MAX_ROUNDS` rounds;
   a shard a child failed on keeps that child's error.
A child builds its engine pair once, for its first shard, and keeps it for the rest. Shard
files are written atomically and named by content, and a shard's seed comes from its content
(`shard_seed`), so neither the number of GPUs nor which worker wrote a shard changes a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, WorkerStatus
from prefect.deployments import run_deployment
from prefect.futures import as_completed
from pydantic import TypeAdapter

from tasks.atomic_files import write_text_atomically
from tasks.config import DatasetConfig
from tasks.generation import ShardOutcome, generate_shard
from tasks.layout import DataDir
from tasks.lineage import Generation
from tasks.planning import Shard

logger = logging.getLogger(__name__)

MAX_ROUNDS = 2
POLL_SECONDS = 2.0


class ShardNotGenerated(RuntimeError):
    """The child flow run that had the shard ended without writing it."""


@dataclass(frozen=True)
class WorkOrder:
    """What a child flow run needs to generate shards of a run, read from shared storage."""

    config: DatasetConfig
    generation: Generation
    run_id: str
    shards: tuple[Shard, ...]

    def select(self, keys: list[str]) -> list[Shard]:
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


def read_work_order(data: DataDir, run_id: str) -> WorkOrder:
    return _WORK_ORDER.validate_json(data.work_order(run_id).read_bytes())


Outcome = ShardOutcome | BaseException


def generate_in_process(shards: list[Shard], config: DatasetConfig, generation: Generation,
                        run_id: str, data: DataDir) -> list[Outcome]:
    """Every shard through this process's engine pair; outcomes in shard order."""
    futures = generate_shard.map(shards, config=unmapped(config), generation=unmapped(generation),
                                 run_id=unmapped(run_id), data=unmapped(data))
    progress = _progress_bar(run_id)
    for done, _ in enumerate(as_completed(futures), start=1):
        progress(done, len(futures))
    outcomes: list[Outcome] = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except Exception as error:  # noqa: BLE001 - reported per shard, the others go on
            outcomes.append(error)
    return outcomes


def generate_on_workers(shards: list[Shard], config: DatasetConfig, generation: Generation,
                        run_id: str, data: DataDir, deployment: str, workers: int | None
                        ) -> list[Outcome]:
    """Every shard through child flow runs of `deployment`, one share per worker (`workers`,
    default: the workers online in the deployment's pool); outcomes in shard order."""
    paths = {shard.key: data.shard(config.name, shard.key) for shard in shards}
    reused = {key for key, path in paths.items() if path.exists()}
    write_work_order(WorkOrder(config, generation, run_id, tuple(shards)), data)
    shares = workers or online_workers(deployment)
    progress = _progress_bar(run_id)
    errors: dict[str, str] = {}
    pending = [shard for shard in shards if shard.key not in reused]
    for round_number in range(1, MAX_ROUNDS + 1):
        if not pending:
            break
        children = _start_children(deployment, pending, shares, data, run_id, round_number)
        finished = _wait(children, paths, progress)
        crashed, errors = _unwritten(finished, paths, errors)
        pending = [shard for shard in pending if shard.key in crashed]
        if pending and round_number < MAX_ROUNDS:
            logger.warning("%d shards lost with crashed workers; dealing them out again",
                           len(pending))
    return [ShardOutcome(shard, str(paths[shard.key]), reused=shard.key in reused)
            if paths[shard.key].exists() else ShardNotGenerated(errors[shard.key])
            for shard in shards]


def online_workers(deployment: str) -> int:
    """Workers online in the deployment's work pool (at least one: a share waits for one)."""
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
        workers = client.read_workers_for_work_pool(pool)
    online = sum(worker.status == WorkerStatus.ONLINE for worker in workers)
    logger.info("%d workers online in work pool %s", online, pool)
    return max(online, 1)


def _start_children(deployment: str, shards: list[Shard], shares: int, data: DataDir,
                    run_id: str, round_number: int) -> dict[str, tuple[FlowRun, list[str]]]:
    """One child flow run per non-empty share, by flow run id."""
    children = {}
    for index in range(shares):
        keys = [shard.key for shard in shards[index::shares]]
        if keys:
            child = run_deployment(
                deployment, timeout=0, flow_run_name=f"{run_id}-r{round_number}-{index}",
                parameters={"data_dir": str(data.root), "run_id": run_id, "shard_keys": keys})
            children[str(child.id)] = (child, keys)
    logger.info("round %d: %d shards over %d child flow runs of %s", round_number,
                len(shards), len(children), deployment)
    return children


def _wait(children: dict[str, tuple[FlowRun, list[str]]], paths: dict[str, Path],
          progress: Callable[[int, int], None]) -> dict[str, tuple[FlowRun, list[str]]]:
    """Poll until every child's state is final; their final flow runs, by id."""
    with get_client(sync_client=True) as client:
        while True:
            latest = {id_: (client.read_flow_run(child.id), keys)
                      for id_, (child, keys) in children.items()}
            progress(sum(path.exists() for path in paths.values()), len(paths))
            if all(run.state is not None and run.state.is_final() for run, _ in latest.values()):
                return latest
            time.sleep(POLL_SECONDS)


def _unwritten(finished: dict[str, tuple[FlowRun, list[str]]], paths: dict[str, Path],
               errors: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """Shards the children did not write: those of crashed children, and every one's error."""
    crashed, errors = set(), dict(errors)
    for run, keys in finished.values():
        for key in keys:
            if paths[key].exists():
                continue
            errors[key] = (f"child flow run {run.name} ended {run.state.name}: "
                           f"{run.state.message or 'no message'}")
            if run.state.is_crashed():
                crashed.add(key)
    return crashed, errors


def _progress_bar(run_id: str) -> Callable[[int, int], None]:
    """A progress artifact that fills as shards are done."""
    artifact = create_progress_artifact(0.0, description=f"Shards of {run_id} generated")
    shown = [0.0]

    def update(done: int, total: int) -> None:
        percent = 100.0 * done / max(total, 1)
        if percent != shown[0]:
            update_progress_artifact(artifact, percent)
            shown[0] = percent
    return update
