"""Shards of prompts, generated with the mixing sampler (rows: tasks/shard_rows.py) and
written atomically as Parquet, here in this process's engine pair (over GPU workers:
tasks/fan_out.py).

A shard's key (see tasks/planning.py) hashes everything that changes its samples, so a rerun
finds a finished shard by name and skips it; a crashed write leaves only a temporary file.
Every row carries its lineage: the generation, the run that generated it, the code version
and each checkpoint's name and fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, UTC
from pathlib import Path

from prefect import task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.states import State

from sampler.models import ResolvedModel
from tasks.config import ENGINE_ROLES, TINY_PREFIX, DatasetConfig
from tasks.atomic_files import write_atomically
from tasks.engines import ENGINES, EngineBuildError
from tasks.layout import DataDir
from tasks.lineage import Generation
from tasks.planning import Shard
from tasks.shard_rows import build_sampler, generate_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardOutcome:
    shard: Shard
    path: str
    reused: bool


@task(name="check-models")
def check_models(config: DatasetConfig, model_paths: tuple[str, str]
                 ) -> tuple[ResolvedModel, ResolvedModel]:
    """Both models (`resolve_models`) loadable and compatible, checked once before any shard:
    a missing model fails the run in seconds with one message naming its field, not once per
    shard. Their tokenizers serve the rest of the run (staging's screen)."""
    from sampler.models import resolve_pair

    return resolve_pair(*model_paths, chat_template=config.prompts.chat_template)


class TooFewGPUs(RuntimeError):
    """This process sees fewer GPUs than the dataset's engine pair needs."""


def check_gpus(config: DatasetConfig, visible: int | None) -> None:
    """Refuse, before any engine is built, a dataset whose engine needs more GPUs than the
    `visible` ones (`visible_gpus()`); None (no CUDA: the CPU build runs a rank on each
    core, which vLLM checks itself) skips it."""
    for role in ENGINE_ROLES:
        needed = getattr(config.engine, role).get("tensor_parallel_size", 1)
        if visible is not None and visible < needed:
            raise TooFewGPUs(
                f"dataset {config.name}: engine.{role}.tensor_parallel_size needs {needed} "
                f"GPUs, this worker sees {visible} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); start its workers "
                f"with deployments/start-gpu-workers.sh --gpus-per-worker {needed}")


def visible_gpus() -> int | None:
    """The GPUs this process sees; None without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def resolve_models(config: DatasetConfig) -> tuple[str, str]:
    """Checkpoint paths; `tiny:teacher` / `tiny:theta` name the committed trained pair
    (`models/tiny`, or the folder in DISTILL_TINY_MODELS_DIR)."""
    names = (config.models.teacher, config.models.theta)
    if not any(name.startswith(TINY_PREFIX) for name in names):
        return names
    from sampler.tiny_models import TINY_PAIR_DIR, tiny_pair_paths

    root = Path(os.environ.get("DISTILL_TINY_MODELS_DIR", TINY_PAIR_DIR))
    pair = dict(zip(("teacher", "theta"), tiny_pair_paths(root)))
    return tuple(str(pair[name.removeprefix(TINY_PREFIX)]) if name.startswith(TINY_PREFIX)
                 else name for name in names)


def _worth_retrying(_task: object, _task_run: object, state: State) -> bool:
    """Retry a shard unless its engine pair cannot be built: that fails the same way again."""
    return not isinstance(state.result(raise_on_failure=False), EngineBuildError)


@task(name="generate-shard", retries=1, retry_delay_seconds=5,
      retry_condition_fn=_worth_retrying)
def generate_shard(shard: Shard, config: DatasetConfig, generation: Generation, run_id: str,
                   data: DataDir) -> ShardOutcome:
    """Generate a shard unless its finished file already exists (it then keeps the lineage
    of the run that generated it)."""
    path = data.shard(config.name, shard.key)
    if path.exists():
        logger.info("shard %d (%s) already generated; reusing", shard.index, shard.key)
        return ShardOutcome(shard, str(path), reused=True)
    engine_key = json.dumps([asdict(generation.teacher), asdict(generation.theta),
                             config.engine.model_dump()], sort_keys=True)
    lineage = generation.row_lineage(run_id, datetime.now(UTC).replace(tzinfo=None))
    table = ENGINES.run(engine_key, lambda: build_sampler(config, generation),
                        lambda sampler: generate_rows(sampler, config, shard, lineage),
                        f"models.teacher {generation.teacher.path!r} and models.theta "
                        f"{generation.theta.path!r}")
    write_atomically(table, path, "shard-write")
    logger.info("shard %d (%s): %d rows written", shard.index, shard.key, table.num_rows)
    return ShardOutcome(shard, str(path), reused=False)


Outcome = ShardOutcome | BaseException


def generate_in_process(shards: list[Shard], config: DatasetConfig, generation: Generation,
                        run_id: str, data: DataDir) -> list[Outcome]:
    """Every shard through this process's engine pair; outcomes in shard order."""
    check_gpus(config, visible_gpus())
    futures = generate_shard.map(shards, config=unmapped(config), generation=unmapped(generation),
                                 run_id=unmapped(run_id), data=unmapped(data))
    progress = progress_bar(run_id)
    for done, _ in enumerate(as_completed(futures), start=1):
        progress(done, len(futures))
    outcomes: list[Outcome] = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except Exception as error:  # noqa: BLE001 - reported per shard, the others go on
            outcomes.append(error)
    return outcomes


def progress_bar(run_id: str) -> Callable[[int, int], None]:
    """A progress artifact that fills as shards are done."""
    artifact = create_progress_artifact(0.0, description=f"Shards of {run_id} generated")
    shown = [0.0]

    def update(done: int, total: int) -> None:
        percent = 100.0 * done / max(total, 1)
        if percent != shown[0]:
            update_progress_artifact(artifact, percent)
            shown[0] = percent
    return update
