"""The fused Triton mixing kernels: compiled on CUDA where there is a GPU, else run by
Triton's interpreter on the CPU (CI).

They are checked against the float64 reference
(α, log q, log t, log θ) and, for the Gumbel-max draw, by a χ² test against q. Rows are split
into chunks as on the GPU (small chunks here, so that each row spans several).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from scipy.special import logsumexp  # noqa: E402
from scipy.stats import chi2  # noqa: E402

import sampler.fused_mixing as fused_mixing  # noqa: E402
import sampler.mixing as mixing  # noqa: E402
from sampler.mixing import MixingConfig, mix_and_draw, unmixable_rows  # noqa: E402
from sampler.reference import reference_alpha, reference_mixture  # noqa: E402
from hard_rows import VOCAB as HARD_VOCAB  # noqa: E402
from hard_rows import (assert_alpha_within_derived_bounds, assert_matches_reference,  # noqa: E402
                       disjoint_row, hard_cases, near_identical_pairs)

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def on_device():
    """Tensors made in a test live where the kernels run."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


@pytest.fixture
def fused_backend(monkeypatch):
    monkeypatch.setattr(mixing, "BACKEND", "fused")


@pytest.fixture(params=[(8192, 1024), (512, 128)], ids=["one-chunk", "six-chunks"])
def chunking(request, monkeypatch):
    """The GPU's chunking, and chunks small enough that a 3,000-token row spans six."""
    chunk, block = request.param
    monkeypatch.setattr(fused_mixing, "CHUNK", chunk)
    monkeypatch.setattr(fused_mixing, "BLOCK", block)


def log_normalise(values: np.ndarray) -> np.ndarray:
    return values - logsumexp(values, axis=-1, keepdims=True)


def keys_for(rows: int, seed: int = 0) -> torch.Tensor:
    """Fixed draw keys of rows 0..rows−1 at position 0, as the lockstep derives them."""
    return torch.tensor(mixing.draw_keys(seed, np.arange(rows), np.zeros(rows, dtype=np.int64)))


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance", "fixed"])
def test_fused_path_matches_float64_reference(fused_backend, chunking, method):
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    rows, vocab, width = 12, 3000, 3072
    teacher = torch.randn(rows, width, generator=generator) * torch.linspace(0.5, 6, rows)[:, None]
    theta = 0.6 * teacher + torch.randn(rows, width, generator=generator) * 2.0
    config = MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0, fixed_alpha=0.35,
                          temperature=1.3)
    draw = mix_and_draw(teacher, theta, vocab, config, keys_for(rows, 17))
    log_t = log_normalise(teacher[:, :vocab].double().cpu().numpy() / 1.3)
    log_s = log_normalise(theta[:, :vocab].double().cpu().numpy() / 1.3)
    for row in range(rows):
        alpha = reference_alpha(log_t[row], log_s[row], method, 0.0, 1.0, 0.35)
        log_q = reference_mixture(log_t[row], log_s[row], alpha)
        token = int(draw.token_ids[row])
        assert abs(float(draw.alpha[row]) - alpha) < 1e-4
        assert abs(float(draw.log_q[row]) - log_q[token]) < 1e-4
        assert abs(float(draw.log_teacher[row]) - log_t[row, token]) < 1e-4
        assert abs(float(draw.log_theta[row]) - log_s[row, token]) < 1e-4


def test_fused_gumbel_draws_follow_q():
    """2,000 rows with the same pair of distributions, each its own key: χ² against q."""
    generator = torch.Generator(device=DEVICE).manual_seed(8)
    vocab, rows, alpha = 24, 2000, 0.6
    teacher = (torch.randn(1, vocab, generator=generator) * 2).expand(rows, -1).contiguous()
    theta = (torch.randn(1, vocab, generator=generator) * 2).expand(rows, -1).contiguous()
    norms = fused_mixing.log_normalisers(teacher, theta, vocab, 1.0)
    tokens, *_ = fused_mixing.draw(teacher, theta, vocab, 1.0, norms, torch.full((rows,), alpha),
                                   keys_for(rows, 99))
    log_t = log_normalise(teacher[0].double().cpu().numpy())
    log_s = log_normalise(theta[0].double().cpu().numpy())
    q = np.exp(reference_mixture(log_t, log_s, alpha))
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)

    def p_value(probabilities: np.ndarray) -> float:
        expected = probabilities * rows
        big = expected >= 5
        observed, wanted = counts[big], expected[big]
        if (~big).any():
            observed = np.append(observed, counts[~big].sum())
            wanted = np.append(wanted, expected[~big].sum())
        return float(chi2.sf(((observed - wanted) ** 2 / wanted).sum(), len(observed) - 1))

    assert p_value(q) > 1e-3
    assert p_value(np.exp(log_t)) < 1e-9 and p_value(np.exp(log_s)) < 1e-9


def test_fused_draw_follows_the_key_not_the_row_position(fused_backend):
    """The same rows with the same keys in another order draw the same token per row."""
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    teacher = torch.randn(6, 500, generator=generator)
    theta = torch.randn(6, 500, generator=generator)
    keys = keys_for(6, 4)
    first = mix_and_draw(teacher, theta, 500, MixingConfig(), keys)
    order = torch.tensor([2, 0, 5, 3, 1, 4])
    shuffled = mix_and_draw(teacher[order], theta[order], 500, MixingConfig(), keys[order])
    assert torch.equal(first.token_ids[order], shuffled.token_ids)


def test_changing_one_rows_key_changes_only_that_rows_draw():
    """Six copies of a near-uniform row over 500 tokens (a repeated token is then a 1-in-500
    event, and the keys are fixed): a new key for row 2 gives it another token; the other
    rows draw exactly what they drew."""
    generator = torch.Generator(device=DEVICE).manual_seed(9)
    teacher = (torch.randn(1, 500, generator=generator) * 0.1).expand(6, -1).contiguous()
    theta = (torch.randn(1, 500, generator=generator) * 0.1).expand(6, -1).contiguous()
    norms = fused_mixing.log_normalisers(teacher, theta, 500, 1.0)
    alpha = torch.full((6,), 0.5)
    keys = keys_for(6, 5)
    first, *_ = fused_mixing.draw(teacher, theta, 500, 1.0, norms, alpha, keys)
    keys[2] = keys_for(6, 6)[2]
    second, *_ = fused_mixing.draw(teacher, theta, 500, 1.0, norms, alpha, keys)
    others = torch.tensor([0, 1, 3, 4, 5])
    assert torch.equal(first[others], second[others])
    assert first[2] != second[2]


def test_fused_draw_does_not_depend_on_chunking(fused_backend, monkeypatch):
    """Gumbel scores are per (row key, token), so splitting a row differently draws the same."""
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    teacher = torch.randn(5, 2000, generator=generator) * 3
    theta = torch.randn(5, 2000, generator=generator) * 3
    draws = []
    for chunk, block in ((8192, 1024), (256, 64)):
        monkeypatch.setattr(fused_mixing, "CHUNK", chunk)
        monkeypatch.setattr(fused_mixing, "BLOCK", block)
        draws.append(mix_and_draw(teacher, theta, 2000, MixingConfig(), keys_for(5, 6)))
    assert torch.equal(draws[0].token_ids, draws[1].token_ids)
    assert torch.allclose(draws[0].alpha, draws[1].alpha, atol=1e-5)


def assert_solver_meets_tolerance(teacher: torch.Tensor, theta: torch.Tensor, method: str):
    """The fused solver's α (on [0, 1], tolerance 1e-6) against Brent's method in float64."""
    rows, vocab = teacher.shape
    alpha = fused_mixing.solve_alpha(teacher, theta, vocab, 1.0, method, 0.0, 1.0, 1e-6,
                                     mixing.ROUNDING_SLACK, mixing.SMALL_RATIO, 0.5)
    log_t = log_normalise(teacher.double().cpu().numpy())
    log_s = log_normalise(theta.double().cpu().numpy())
    for row in range(rows):
        expected = reference_alpha(log_t[row], log_s[row], method, 0.0, 1.0, 0.5)
        assert abs(float(alpha[row]) - expected) < 2e-6


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance"])
def test_fused_solver_meets_tolerance_without_newton(monkeypatch, method):
    """With Newton switched off, the bisection tail alone still brackets α within 1e-6."""
    monkeypatch.setattr(fused_mixing, "NEWTON_STEPS", 0)
    generator = torch.Generator(device=DEVICE).manual_seed(11)
    teacher = torch.randn(6, 700, generator=generator) * 4
    theta = torch.randn(6, 700, generator=generator) * 4
    assert_solver_meets_tolerance(teacher, theta, method)


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance"])
def test_fused_newton_converges_in_its_passes(monkeypatch, method):
    """Newton alone (no bisection tail) meets 1e-6 within NEWTON_STEPS passes, chunked rows:
    it needs the exact slope, so this checks the merged variance and tilted means."""
    monkeypatch.setattr(fused_mixing, "bisection_steps", lambda *_: 0)
    monkeypatch.setattr(fused_mixing, "CHUNK", 256)
    monkeypatch.setattr(fused_mixing, "BLOCK", 64)
    generator = torch.Generator(device=DEVICE).manual_seed(12)
    teacher = torch.randn(6, 1500, generator=generator) * 3
    theta = 0.5 * teacher + torch.randn(6, 1500, generator=generator) * 2
    assert_solver_meets_tolerance(teacher, theta, method)


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance", "fixed"])
def test_fused_path_on_rows_real_models_produce(fused_backend, chunking, method):
    """The cases of `hard_rows` (blocks hundreds of nats below the maximum, −inf logits,
    temperature 0.05, one-hot rows, identical models) within 1e-4 of float64, in one batch
    per temperature. (`entropy` has no fused path; `_use_fused` sends it to the torch code.)"""
    for case in hard_cases():
        config = MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0,
                              temperature=case.temperature)
        assert mixing._use_fused(case.teacher, config)
        draw = mix_and_draw(case.teacher, case.theta, HARD_VOCAB, config,
                            keys_for(case.teacher.shape[0], 3))
        assert_matches_reference(case, draw, config)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (0.5, 1.0)])
@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance", "fixed"])
def test_fused_alpha_where_the_models_nearly_agree(fused_backend, method, bounds, monkeypatch):
    """Scaled copies, copies plus tiny noise and a shifted copy (Var_q(log t − log θ) from
    0 and 1e-12 to 1e-4), rows in six chunks: every α within its derived bound of the
    reference (q where that bound is loose), as on the torch path."""
    monkeypatch.setattr(fused_mixing, "CHUNK", 256)
    monkeypatch.setattr(fused_mixing, "BLOCK", 64)
    teacher, theta = near_identical_pairs(1500)
    config = MixingConfig(alpha_method=method, alpha_min=bounds[0], alpha_max=bounds[1])
    draw = mix_and_draw(torch.tensor(teacher, dtype=torch.float32),
                        torch.tensor(theta, dtype=torch.float32), 1500, config,
                        keys_for(len(teacher), 2))
    assert_alpha_within_derived_bounds(teacher, theta, draw.alpha, config, method)


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance"])
def test_float32_schedule_settles_separated_rows_and_hands_agreeing_ones_to_float64(method):
    """Rows with Var_q(log t − log θ) ≥ 1 are settled by the float32 schedule (the fast path
    must be the one taken); every near-identical row (Var ≤ 1e-4) goes to float64."""
    generator = torch.Generator(device=DEVICE).manual_seed(13)
    separated = torch.randn(6, 700, generator=generator) * 2
    other = 0.5 * separated + torch.randn(6, 700, generator=generator) * 2
    close_teacher, close_theta = near_identical_pairs(500)
    for teacher, theta, expected in (
            (separated, other, False),
            (torch.tensor(close_teacher, dtype=torch.float32),
             torch.tensor(close_theta, dtype=torch.float32), True)):
        _, precise = fused_mixing.solve_alpha_in_tiers(
            teacher, theta, teacher.shape[1], 1.0, method, 0.0, 1.0, 1e-6,
            mixing.ROUNDING_SLACK, mixing.SMALL_RATIO, 0.5)
        assert (precise != 0).tolist() == [expected] * teacher.shape[0]


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance", "fixed"])
def test_fused_path_reports_a_row_with_no_common_support(fused_backend, method):
    teacher, theta = disjoint_row()
    good = hard_cases()[3]
    config = MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0)
    draw = mix_and_draw(torch.cat([good.teacher, teacher]), torch.cat([good.theta, theta]),
                        HARD_VOCAB, config, keys_for(5, 1))
    assert unmixable_rows(draw.record().cpu().numpy()).tolist() == [4]



@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["kl_symmetry", "fixed"])
def test_graphed_mixing_repeats_the_eager_kernels_exactly(fused_backend, method):
    """Replays (rows off the bucket, theta rows permuted, keys changing, a second config)
    give the eager kernels' tokens and records bit for bit."""
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    rows, vocab = 37, 3_000
    graphed = mixing.GraphedMixing(vocab, max_rows=64)
    for seed, config in enumerate([MixingConfig(alpha_method=method),
                                   MixingConfig(alpha_method=method, temperature=0.7)] * 2):
        teacher = (torch.randn(rows, vocab + 64, generator=generator) * 3).bfloat16()
        theta = (0.5 * teacher[:, :vocab].float()
                 + torch.randn(rows, vocab, generator=generator) * 2).bfloat16()
        order = torch.randperm(rows, generator=generator)
        keys = keys_for(rows, seed)
        expected = mix_and_draw(teacher, theta[order], vocab, config, keys)
        assert graphed.applies(teacher, config)
        draw, record = graphed(teacher, theta, order, config, keys)
        assert torch.equal(draw.token_ids, expected.token_ids)
        assert torch.equal(record, expected.record())
