"""The child flow a GPU worker runs: its share of a run's shards, on one engine pair.

Deployed on a work pool with one worker per GPU, or per group of GPUs for a tensor-parallel
teacher (deployments/prefect.yaml, deployments/start-gpu-workers.sh --gpus-per-worker); the
distill flow starts one run of it per worker when its `fan_out` parameter names this
deployment (tasks/fan_out.py). A worker that sees fewer GPUs than the dataset's engines need
refuses its share before building them (tasks.generation.check_gpus).
"""

from __future__ import annotations

import socket
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Cancelled, State

from tasks.config import DatasetConfig
from tasks.engines import ENGINES
from tasks.fan_out import RunId, read_work_order
from tasks.generation import check_gpus, generate_shard, resolve_models, visible_gpus
from tasks.layout import DataDir
from tasks.lineage import Generation, describe_generation
from tasks.planning import ShardKey


class ShardsFailed(RuntimeError):
    """Some shards of the share failed (the message: each distinct cause); the others were
    written."""


class OtherGeneration(RuntimeError):
    """This worker's code or checkpoints would make rows of another generation."""


def check_same_generation(config: DatasetConfig, expected: Generation) -> Generation:
    """This machine's generation: the same as the parent's (sampler code and checkpoint
    fingerprints), with the checkpoint paths found here, which the share loads and its rows
    record; refused if it differs (its rows would not be what the run describes)."""
    here = describe_generation(config, resolve_models(config))
    if here.key == expected.key:
        return here
    differences = [f"{name} {mine!r} here, {theirs!r} in the run" for name, mine, theirs in (
        ("sampler_version", here.sampler_version, expected.sampler_version),
        ("teacher fingerprint", here.teacher.fingerprint, expected.teacher.fingerprint),
        ("theta fingerprint", here.theta.fingerprint, expected.theta.fingerprint))
        if mine != theirs]
    raise OtherGeneration(f"worker on {socket.gethostname()} makes generation {here.key}, the "
                          f"run is generation {expected.key}: {'; '.join(differences)}")


@flow(name="generate-shards")
def generate_shards(data_dir: str, run_id: RunId, shard_keys: list[ShardKey]) -> int | State:
    """Generate the shards `shard_keys` of run `run_id` one after another; the engine pair is
    built for the first and kept for the rest. Returns how many were generated or reused.
    `run_id` and `shard_keys` name files under `data_dir`: Prefect refuses a run whose values
    do not have their formats (RunId, ShardKey), naming the parameter.

    A share that starts after its run ended (the run removes its work order when it ends, and
    may leave queued shares behind) has nothing to do: Cancelled, saying so. A run killed
    outright keeps its work order, so its queued shares still generate: their shard files are
    named by content, and the date's next run reuses them.
    """
    data = DataDir(Path(data_dir))
    try:
        order = read_work_order(data, run_id)
    except FileNotFoundError:
        return Cancelled(message=f"run {run_id} has ended (its work order "
                                 f"{data.work_order(run_id)} is gone): nothing to generate")
    generation = check_same_generation(order.config, order.generation)
    check_gpus(order.config, visible_gpus())
    causes: dict[str, list[int]] = {}
    try:
        for shard in order.select(shard_keys):
            try:
                generate_shard(shard, order.config, generation, run_id, data)
            except Exception as error:  # noqa: BLE001 - the share's other shards go on
                causes.setdefault(str(error), []).append(shard.index)
    finally:
        ENGINES.release()
    if causes:
        # Each cause once, without the shards: the parent names them, and shares that failed
        # the same way (a pair no worker can build) then read as one problem.
        get_run_logger().error("failed shards by cause: %s", causes)
        raise ShardsFailed(" | ".join(causes))
    get_run_logger().info("%d shards of run %s done on %d engine pair(s) built here",
                          len(shard_keys), run_id, ENGINES.builds)
    return len(shard_keys)
