"""What a shard's rows are: the sampler built from a dataset's settings, the round's seed and
each sample's draw key, and the rows it draws.

This module and `sampler/` are the generation code: their hash is the sampler version in
every generation key (tasks/lineage.py), so only what changes the samples belongs here;
the task around it (reuse, retries, writing) is in tasks/generation.py.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pyarrow as pa

from sampler.prompts import stored_prompt
from sampler.soft_targets import SOFT_TARGET_COLUMNS
from tasks.config import DatasetConfig
from tasks.lineage import Generation
from tasks.planning import Shard

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
    # checkpoints by name and fingerprint: their local folders stay in the catalog
    ("teacher_model", pa.string()), ("teacher_fingerprint", pa.string()),
    ("theta_model", pa.string()), ("theta_fingerprint", pa.string()),
])
#: With `sampling.top_logprobs` on, one list of k per generated token and model: ids as
#: int32 like `token_ids`, log-probs as float32 like `log_q` (they are computed in float32,
#: so float64 would store no more digits and twice the bytes).
SOFT_TARGET_FIELDS = [pa.field(name, pa.list_(pa.list_(
    pa.int32() if name.endswith("_ids") else pa.float32()))) for name in SOFT_TARGET_COLUMNS]


def shard_schema(top_logprobs: int) -> pa.Schema:
    """`SHARD_SCHEMA`, and the soft-target columns only when they are recorded: a dataset
    without them writes the same shards as before they existed."""
    return SHARD_SCHEMA if not top_logprobs else pa.schema([*SHARD_SCHEMA, *SOFT_TARGET_FIELDS])


def build_sampler(config: DatasetConfig, generation: Generation):
    """The engine pair on the checkpoints the generation fingerprinted."""
    from sampler.api import OptimalSamplingV1

    if config.engine.cpu_kv_cache_gib:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.engine.cpu_kv_cache_gib)
    return OptimalSamplingV1(generation.teacher.path, generation.theta.path,
                             **sampler_arguments(config))


def sampler_arguments(config: DatasetConfig) -> dict[str, Any]:
    """OptimalSamplingV1's keyword arguments from the dataset's sampling and engine
    settings: the shared engine settings, and each engine's own (`engine.teacher`,
    `engine.theta`) to merge over them."""
    engine, sampling = config.engine, config.sampling
    return {"alpha_method": sampling.alpha_method, "alpha_min": sampling.alpha_min,
            "alpha_max": sampling.alpha_max, "fixed_alpha": sampling.fixed_alpha,
            "max_model_len": engine.max_model_len, "max_num_seqs": engine.max_num_seqs,
            "dtype": engine.dtype, "enforce_eager": engine.enforce_eager,
            "theta_process": engine.theta_process,
            "teacher_engine_args": dict(engine.teacher),
            "theta_engine_args": dict(engine.theta)}


def round_seed(config: DatasetConfig, sample_round: str) -> int:
    """The call seed of every shard of a round: from the dataset seed and the round (a run
    date for samples_per_run)."""
    return _hash63(f"{config.sampling.seed}:{sample_round}")


def row_key(prompt_id: str, content_hash: str, sample_index: int) -> int:
    """A sample's own draw key: with the round's seed it fixes the sample's draws, so neither
    the shard it lands in, the shard size, the number of GPUs nor which worker wrote it
    changes a row."""
    return _hash63(f"{prompt_id}:{content_hash}:{sample_index}")


def _hash63(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def generate_rows(sampler, config: DatasetConfig, shard: Shard,
                  lineage: dict[str, object]) -> pa.Table:
    """Generate every sample of the shard's prompts; rows the model refuses keep their error."""
    expanded = [(prompt, sample) for prompt in shard.prompts for sample in range(shard.samples)]
    seed = round_seed(config, shard.sample_round)
    teacher_format, theta_format = config.prompts.formats()
    output = sampler.generate(
        [p.teacher_prompt for p, _ in expanded], [p.theta_prompt for p, _ in expanded],
        max_tokens=config.sampling.max_tokens, seed=seed, show_progress=False,
        mixing=config.sampling.mixing(), top_logprobs=config.sampling.top_logprobs,
        teacher_format=teacher_format, theta_format=theta_format,
        row_keys=[row_key(p.prompt_id, p.content_hash, s) for p, s in expanded])
    stats = output.per_row_alpha_stats or [{}] * len(expanded)
    columns = {
        "prompt_id": [p.prompt_id for p, _ in expanded],
        "sample_index": [s for _, s in expanded],
        "content_hash": [p.content_hash for p, _ in expanded],
        "teacher_prompt": [stored_prompt(p.teacher_prompt) for p, _ in expanded],
        "theta_prompt": [stored_prompt(p.theta_prompt) for p, _ in expanded],
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
    if config.sampling.top_logprobs:
        columns.update({name: getattr(output, name) for name in SOFT_TARGET_COLUMNS})
    return pa.table(columns, schema=shard_schema(config.sampling.top_logprobs))
