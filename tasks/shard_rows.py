"""What a shard's rows are: the sampler built from a dataset's settings, the shard's seed,
and the rows it draws.

This module and `sampler/` are the generation code: their hash is the sampler version in
every generation key (tasks/lineage.py), so only what changes the samples belongs here;
the task around it (reuse, retries, writing) is in tasks/generation.py.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pyarrow as pa

from sampler.prompts import PromptFormat
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
