"""Shards of prompts, generated with the mixing sampler and written atomically as Parquet.

A shard's key (see tasks/planning.py) hashes everything that changes its samples, so a rerun
finds a finished shard by name and skips it; a crashed write leaves only a temporary file.
Every row carries its lineage: the generation, the run that generated it, the code version
and each checkpoint's path and fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime, UTC
from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.states import State

from sampler.prompts import PromptFormat
from tasks.config import TINY_PREFIX, DatasetConfig
from tasks.atomic_files import write_atomically
from tasks.engines import ENGINES, EngineBuildError
from tasks.layout import DataDir
from tasks.lineage import Generation
from tasks.planning import Shard

logger = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_index", pa.int32()), ("content_hash", pa.string()),
    ("teacher_prompt", pa.string()), ("theta_prompt", pa.string()),
    # the exact ids each model read (its own system prompt and chat template), so training
    # tokens are these plus token_ids, never a re-tokenisation of the text
    ("teacher_prompt_ids", pa.list_(pa.int32())), ("theta_prompt_ids", pa.list_(pa.int32())),
    ("completion_text", pa.string()), ("token_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()), ("finish_reason", pa.string()), ("error", pa.string()),
    ("alpha", pa.list_(pa.float32())), ("log_q", pa.list_(pa.float32())),
    ("log_teacher", pa.list_(pa.float32())), ("log_theta", pa.list_(pa.float32())),
    ("alpha_mean", pa.float64()), ("alpha_std", pa.float64()), ("alpha_min", pa.float64()),
    ("alpha_max", pa.float64()), ("seed", pa.int64()), ("sample_round", pa.string()),
    # lineage, the same for every row of a shard (Generation.row_lineage)
    ("generation", pa.string()), ("generated_run_id", pa.string()),
    ("generated_at", pa.timestamp("us")), ("sampler_version", pa.string()),
    ("generated_commit", pa.string()), ("generated_dirty", pa.bool_()),
    ("teacher_model", pa.string()), ("teacher_path", pa.string()),
    ("teacher_fingerprint", pa.string()), ("theta_model", pa.string()),
    ("theta_path", pa.string()), ("theta_fingerprint", pa.string()),
])


@dataclass(frozen=True)
class ShardOutcome:
    shard: Shard
    path: str
    reused: bool


@task(name="check-models")
def check_models(config: DatasetConfig) -> None:
    """Both models loadable and compatible, checked once before any shard: a missing model
    fails the run in seconds with one message naming its field, not once per shard."""
    from sampler.models import resolve_pair

    resolve_pair(*resolve_models(config), chat_template=config.prompts.chat_template)


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


def _build_sampler(config: DatasetConfig, generation: Generation):
    """The engine pair on the checkpoints the generation fingerprinted."""
    from sampler.api import OptimalSamplingV1

    teacher, theta = generation.teacher.path, generation.theta.path
    engine = config.engine
    if engine.cpu_kv_cache_gib:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.cpu_kv_cache_gib)
    return OptimalSamplingV1(
        teacher, theta, alpha_method=config.sampling.alpha_method,
        alpha_min=config.sampling.alpha_min, alpha_max=config.sampling.alpha_max,
        fixed_alpha=config.sampling.fixed_alpha, max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs, dtype=engine.dtype, enforce_eager=engine.enforce_eager,
        theta_process=engine.theta_process)


def shard_seed(config: DatasetConfig, shard: Shard) -> int:
    """From the dataset seed, the round (a run date for samples_per_run) and the shard."""
    text = f"{config.sampling.seed}:{shard.sample_round}:{shard.key}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def generate_rows(sampler, config: DatasetConfig, shard: Shard,
                  lineage: dict[str, object]) -> pa.Table:
    """Generate every sample of the shard's prompts; rows the model refuses keep their error."""
    expanded = [(prompt, sample) for prompt in shard.prompts for sample in range(shard.samples)]
    seed = shard_seed(config, shard)
    output = sampler.generate(
        [p.teacher_prompt for p, _ in expanded], [p.theta_prompt for p, _ in expanded],
        max_tokens=config.sampling.max_tokens, seed=seed, show_progress=False,
        mixing=config.sampling.mixing(),
        teacher_format=PromptFormat(config.prompts.teacher_system, config.prompts.chat_template),
        theta_format=PromptFormat(config.prompts.theta_system, config.prompts.chat_template))
    stats = output.per_row_alpha_stats or [{}] * len(expanded)
    columns = {
        "prompt_id": [p.prompt_id for p, _ in expanded],
        "sample_index": [s for _, s in expanded],
        "content_hash": [p.content_hash for p, _ in expanded],
        "teacher_prompt": [p.teacher_prompt for p, _ in expanded],
        "theta_prompt": [p.theta_prompt for p, _ in expanded],
        "teacher_prompt_ids": output.teacher_prompt_ids,
        "theta_prompt_ids": output.theta_prompt_ids,
        "completion_text": output.generated_texts,
        "token_ids": output.generated_ids,
        "num_tokens": output.num_tokens,
        "finish_reason": output.finish_reasons,
        "error": [None if error is None else
                  f"prompt {p.prompt_id} (source row {p.source_row}): {error.split(': ', 1)[-1]}"
                  for error, (p, _) in zip(output.errors, expanded)],
        "alpha": output.alpha_history,
        "log_q": output.mixed_logprobs,
        "log_teacher": output.teacher_logprobs,
        "log_theta": output.theta_logprobs,
        "alpha_mean": [s.get("mean") if s.get("count") else None for s in stats],
        "alpha_std": [s.get("std") if s.get("count") else None for s in stats],
        "alpha_min": [s.get("min") if s.get("count") else None for s in stats],
        "alpha_max": [s.get("max") if s.get("count") else None for s in stats],
        "seed": [seed] * len(expanded),
        "sample_round": [shard.sample_round] * len(expanded),
        **{name: [value] * len(expanded) for name, value in lineage.items()},
    }
    return pa.table(columns, schema=SHARD_SCHEMA)


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
    table = ENGINES.run(engine_key, lambda: _build_sampler(config, generation),
                        lambda sampler: generate_rows(sampler, config, shard, lineage),
                        f"models.teacher {generation.teacher.path!r} and models.theta "
                        f"{generation.theta.path!r}")
    write_atomically(table, path, "shard-write")
    logger.info("shard %d (%s): %d rows written", shard.index, shard.key, table.num_rows)
    return ShardOutcome(shard, str(path), reused=False)
