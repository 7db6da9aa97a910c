"""The mixing math against the float64 reference, on random distribution pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampler.errors import ConfigError
from sampler.mixing import (ALPHA_METHODS, MixedDraw, MixingConfig, compute_alpha,
                            draw_from_log_probs, draw_keys, mix_and_draw, mixture_log_probs,
                            teacher_support_mask, tempered_log_probs, uniforms_of_keys,
                            unmixable_rows)
from sampler.reference import reference_alpha, reference_mixture
from scipy.special import logsumexp
from hard_rows import VOCAB as HARD_VOCAB
from hard_rows import (assert_alpha_within_derived_bounds, assert_matches_reference,
                       disjoint_row, hard_cases, near_identical_pairs)

VOCAB = 300


def random_pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logit pairs of every kind: flat, peaked (scale up to 12), nearly identical, and
    (appended) pairs whose Var_q(log t − log θ) spans 1e-12 to 1e-4; float32 values."""
    rng = np.random.default_rng(seed)
    rows = 96
    scale = rng.uniform(0.1, 12.0, size=(rows, 1))
    teacher = rng.normal(size=(rows, VOCAB)) * scale
    theta = rng.normal(size=(rows, VOCAB)) * rng.uniform(0.1, 12.0, size=(rows, 1))
    theta[:16] = teacher[:16] + rng.normal(size=(16, VOCAB)) * 1e-3
    theta[16:24] = teacher[16:24] * 1.05
    close_teacher, close_theta = near_identical_pairs(VOCAB, seed)
    return (np.concatenate([teacher.astype(np.float32).astype(np.float64), close_teacher]),
            np.concatenate([theta.astype(np.float32).astype(np.float64), close_theta]))


def keys_for(seed: int, rows: int) -> torch.Tensor:
    """Draw keys of rows 0..rows-1 at position 0."""
    return torch.from_numpy(draw_keys(seed, np.arange(rows), np.zeros(rows, dtype=np.int64)))


def log_normalise(logits: np.ndarray) -> np.ndarray:
    return logits - logsumexp(logits, axis=1, keepdims=True)


def engine_side(teacher: np.ndarray, theta: np.ndarray, config: MixingConfig):
    teacher, theta = (torch.tensor(teacher, dtype=torch.float32),
                      torch.tensor(theta, dtype=torch.float32))
    log_teacher = tempered_log_probs(teacher, VOCAB, config.temperature)
    log_theta = tempered_log_probs(theta, VOCAB, config.temperature)
    alpha = compute_alpha(teacher, theta, VOCAB, config)
    return alpha, mixture_log_probs(log_teacher, log_theta, alpha, config)


@pytest.mark.parametrize("method", ALPHA_METHODS)
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (0.5, 1.0), (0.2, 0.6)])
def test_alpha_and_mixture_match_float64_reference(method, bounds):
    teacher, theta = random_pairs(seed=7)
    config = MixingConfig(alpha_method=method, alpha_min=bounds[0], alpha_max=bounds[1],
                          fixed_alpha=0.3)
    alpha, log_q = engine_side(teacher, theta, config)
    log_teacher, log_theta = log_normalise(teacher), log_normalise(theta)
    # Every row, the near-identical ones included, within the bound derived from its
    # conditioning (hard_rows.alpha_error_bounds); q instead where that bound is loose.
    expected = assert_alpha_within_derived_bounds(teacher, theta, alpha, config, method)
    expected_q = np.stack([np.exp(reference_mixture(log_teacher[i], log_theta[i], expected[i]))
                           for i in range(len(teacher))])
    assert np.all((alpha.numpy() >= bounds[0] - 1e-7) & (alpha.numpy() <= bounds[1] + 1e-7))
    q_error = np.abs(np.exp(log_q.numpy().astype(np.float64)) - expected_q).max()
    assert q_error < 2e-4, q_error


def test_kl_symmetry_root_equalises_both_kls():
    teacher, theta = random_pairs(seed=11)
    alpha, log_q = engine_side(teacher, theta, MixingConfig(alpha_min=0.0, alpha_max=1.0))
    log_teacher, log_theta = log_normalise(teacher), log_normalise(theta)
    for row in range(24, len(teacher)):
        log_q64 = reference_mixture(log_teacher[row], log_theta[row], float(alpha[row]))
        q = np.exp(log_q64)
        kl_theta = np.sum(q * (log_q64 - log_theta[row]))
        kl_teacher = np.sum(q * (log_q64 - log_teacher[row]))
        assert abs(kl_theta - kl_teacher) < 1e-4 * max(1.0, kl_theta)


def test_ess_balance_root_really_balances():
    """Σθ²/q = Σt²/q at the returned α (the seed's bisection converged to an endpoint)."""
    teacher, theta = random_pairs(seed=13)
    config = MixingConfig(alpha_method="ess_balance", alpha_min=0.0, alpha_max=1.0)
    alpha, _ = engine_side(teacher, theta, config)
    log_teacher, log_theta = log_normalise(teacher), log_normalise(theta)
    interior = 0
    for row in range(24, len(teacher)):
        a = float(alpha[row])
        log_q = reference_mixture(log_teacher[row], log_theta[row], a)
        gap = logsumexp(2 * log_theta[row] - log_q) - logsumexp(2 * log_teacher[row] - log_q)
        assert abs(gap) < 1e-3, (row, a, gap)
        interior += 0.01 < a < 0.99
    assert interior >= 50


def test_nearly_identical_models_give_nearly_their_common_distribution():
    teacher, theta = random_pairs(seed=17)
    for method in ALPHA_METHODS:
        _, log_q = engine_side(teacher[:16], theta[:16], MixingConfig(alpha_method=method,
                                                                       alpha_min=0.0))
        difference = np.abs(np.exp(log_q.numpy()) - np.exp(log_normalise(teacher[:16]))).max()
        assert difference < 1e-3


def test_alpha_is_clamped_to_the_configured_range():
    teacher, theta = random_pairs(seed=19)
    alpha, _ = engine_side(teacher, theta, MixingConfig(alpha_min=0.7, alpha_max=0.7))
    assert torch.all(alpha == 0.7)
    unclamped, _ = engine_side(teacher, theta, MixingConfig(alpha_min=0.0, alpha_max=1.0))
    clamped, _ = engine_side(teacher, theta, MixingConfig(alpha_min=0.45, alpha_max=0.55))
    # Rows 0–23 are (nearly) identical pairs whose α is rounding noise; compare the rest.
    assert torch.allclose(clamped[24:], unclamped[24:].clamp(0.45, 0.55), atol=2e-5)


def test_temperature_is_applied_to_both_models_before_alpha():
    teacher, theta = random_pairs(seed=23)
    config = MixingConfig(alpha_min=0.0, temperature=2.5)
    alpha, log_q = engine_side(teacher, theta, config)
    log_teacher, log_theta = log_normalise(teacher / 2.5), log_normalise(theta / 2.5)
    for row in range(24, 40):
        expected = reference_alpha(log_teacher[row], log_theta[row], "kl_symmetry", 0.0, 1.0)
        assert abs(float(alpha[row]) - expected) < 2e-5


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (-1, 0.8), (20, 0.5)])
def test_teacher_support_restricts_q_after_alpha(top_k, top_p):
    teacher, theta = random_pairs(seed=29)
    config = MixingConfig(alpha_min=0.0, top_k=top_k, top_p=top_p)
    alpha, log_q = engine_side(teacher, theta, config)
    free_alpha, _ = engine_side(teacher, theta, MixingConfig(alpha_min=0.0))
    assert torch.equal(alpha, free_alpha)
    log_teacher, log_theta = log_normalise(teacher), log_normalise(theta)
    for row in range(24, 48):
        expected = np.exp(reference_mixture(log_teacher[row], log_theta[row], float(alpha[row]),
                                            top_k, top_p))
        assert np.abs(np.exp(log_q[row].numpy()) - expected).max() < 2e-4
        if top_k != -1:
            assert (expected > 0).sum() <= top_k


def test_inverse_cdf_draw_follows_the_distribution_and_skips_zero_mass():
    probabilities = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    log_q = probabilities.log()
    uniforms = torch.tensor([0.05, 0.1, 0.15, 0.69, 0.71, 0.999])
    tokens = draw_from_log_probs(log_q.expand(len(uniforms), -1), uniforms)
    assert tokens.tolist() == [0, 2, 2, 2, 3, 3]


def test_draws_use_only_the_shared_vocabulary_of_differently_padded_models():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 320, generator=generator)
    theta = torch.randn(64, 310, generator=generator)
    teacher[:, VOCAB:] = 50.0
    theta[:, VOCAB:] = 50.0
    draw = mix_and_draw(teacher, theta, VOCAB, MixingConfig(), keys_for(3, 64))
    assert int(draw.token_ids.max()) < VOCAB
    assert torch.all(draw.log_q <= 0) and torch.all(torch.isfinite(draw.log_q))


@pytest.mark.parametrize("field,kwargs", [
    ("alpha_method", {"alpha_method": "magic"}),
    ("alpha_min", {"alpha_min": 0.8, "alpha_max": 0.6}),
    ("alpha_max", {"alpha_max": 1.5}),
    ("alpha_min", {"alpha_min": -0.1}),
    ("temperature", {"temperature": 0.0}),
    ("top_p", {"top_p": 0.0}),
    ("top_k", {"top_k": 0}),
])
def test_bad_settings_are_refused_with_the_field_named(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        MixingConfig(**kwargs)


@pytest.mark.parametrize("method", ALPHA_METHODS)
@pytest.mark.parametrize("case", hard_cases(), ids=lambda case: case.name)
def test_rows_real_models_produce_match_float64_reference(case, method):
    """Low temperature, blocks far below the maximum, −inf logits, one-hot rows, identical
    models: α and the drawn token's log q, log t, log θ within 1e-4 of float64."""
    config = MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0, fixed_alpha=0.5,
                          temperature=case.temperature)
    draw = mix_and_draw(case.teacher, case.theta, HARD_VOCAB, config,
                        keys_for(1, case.teacher.shape[0]))
    assert_matches_reference(case, draw, config)


@pytest.mark.parametrize("method", ALPHA_METHODS)
def test_a_row_with_no_common_support_is_reported_not_solved(method):
    """Models that allow disjoint token sets cannot be mixed: that row gets NaN (reported by
    `unmixable_rows`), never a silent α; the rows beside it are unaffected."""
    good = hard_cases()[0]
    bad_teacher, bad_theta = disjoint_row()
    teacher = torch.cat([good.teacher[:2], bad_teacher, good.teacher[2:]])
    theta = torch.cat([good.theta[:2], bad_theta, good.theta[2:]])
    config = MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0)
    draw = mix_and_draw(teacher, theta, HARD_VOCAB, config, keys_for(1, 5))
    assert unmixable_rows(draw.record().cpu().numpy()).tolist() == [2]
    keep = torch.tensor([0, 1, 3, 4])
    rest = MixedDraw(*(getattr(draw, name)[keep] for name in
                       ("token_ids", "alpha", "log_q", "log_teacher", "log_theta")))
    assert_matches_reference(good, rest, config)


def test_top_k_then_top_p_in_vllms_order():
    """top-p is taken over the teacher renormalised on its top-k set: of probabilities
    (0.4, 0.31, 0.29), k = 2 leaves (0.56, 0.44), and p = 0.55 keeps only the first, where a
    nucleus of the full distribution (0.4 < 0.55) would keep two."""
    log_teacher = torch.tensor([[0.4, 0.31, 0.29]]).log()
    assert teacher_support_mask(log_teacher, top_k=2, top_p=0.55).tolist() == [[True, False,
                                                                                 False]]
    assert teacher_support_mask(log_teacher, top_k=-1, top_p=0.55).tolist() == [[True, True,
                                                                                  False]]
    expected = reference_mixture(log_teacher[0].double().numpy(), np.log([0.2, 0.2, 0.6]), 0.5,
                                 top_k=2, top_p=0.55)
    assert np.isfinite(expected[0]) and np.isinf(expected[1:]).all()


def test_float64_inverse_cdf_reaches_a_token_of_mass_1e_12():
    """A uniform in the sliver of mass 1e-12 that sits after a token of mass 1 − 1e-12
    draws it: float32 could not tell the two cumulative sums apart."""
    log_q = torch.tensor([[np.log1p(-1e-12), np.log(1e-12)]], dtype=torch.float32)
    assert draw_from_log_probs(log_q, torch.tensor([1.0 - 5e-13], dtype=torch.float64)
                               ).tolist() == [1]
    assert draw_from_log_probs(log_q, torch.tensor([0.5], dtype=torch.float64)).tolist() == [0]


def test_draw_keys_are_non_negative_63_bit_and_each_part_changes_them():
    """Vectorised keys equal the keys computed one at a time; changing the seed, the row key
    or the position gives another key (no collisions among 30,000); all fit 63 bits."""
    rows, positions = np.meshgrid(np.arange(100), np.arange(100), indexing="ij")
    keys = draw_keys(7, rows.ravel(), positions.ravel())
    assert keys.dtype == np.int64 and (keys >= 0).all()
    assert keys[1234] == draw_keys(7, np.array([12]), np.array([34]))[0]
    others = np.concatenate([keys, draw_keys(8, rows.ravel(), positions.ravel()),
                             draw_keys(7, rows.ravel() + 100, positions.ravel())])
    assert len(np.unique(others)) == others.size
    assert draw_keys(-1, np.array([-5]), np.array([3]))[0] >= 0


def test_uniforms_of_keys_are_uniform_on_the_unit_interval():
    """Kolmogorov–Smirnov against U(0, 1) for 200,000 keys of consecutive positions (fixed
    seed): the hash leaves no visible structure."""
    from scipy.stats import kstest

    keys = draw_keys(3, np.zeros(200_000, dtype=np.int64), np.arange(200_000))
    uniforms = uniforms_of_keys(torch.from_numpy(keys)).numpy()
    assert uniforms.dtype == np.float64 and ((uniforms >= 0) & (uniforms < 1)).all()
    assert kstest(uniforms, "uniform").pvalue > 1e-3


def test_a_rows_draw_depends_on_its_key_alone_not_on_the_batch():
    """The same rows in another order, or a row alone, draw the same tokens with the same
    keys (the torch path): nothing of the batch enters a row's draw."""
    teacher, theta = (torch.tensor(x, dtype=torch.float32) for x in random_pairs(seed=31))
    keys = keys_for(5, teacher.shape[0])
    config = MixingConfig(alpha_min=0.0)
    together = mix_and_draw(teacher, theta, VOCAB, config, keys).token_ids
    order = torch.randperm(teacher.shape[0], generator=torch.Generator().manual_seed(2))
    shuffled = mix_and_draw(teacher[order], theta[order], VOCAB, config, keys[order]).token_ids
    assert torch.equal(shuffled, together[order])
    for row in (0, 40, 100):
        alone = mix_and_draw(teacher[row:row + 1], theta[row:row + 1], VOCAB, config,
                             keys[row:row + 1]).token_ids
        assert int(alone) == int(together[row])
