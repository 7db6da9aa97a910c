"""The mixing distribution q ∝ θ^(1-α)·t^α, batched on whatever device the logits are on.

One row is one sequence at one decode step. Per row, in this order:

1. temperature: both models' logits are divided by T, then log-softmaxed over the shared
   vocabulary (the first `vocab_size` columns; checkpoints may pad differently beyond it);
2. support: q lives on the tokens both models allow (a token with a −inf logit in either
   model has q = 0 for every α); α's equations are summed over that common support;
3. alpha: the teacher's weight α from the configured method, clamped to
   [alpha_min, alpha_max]; `kl_symmetry` and `ess_balance` solve a monotone equation by
   safeguarded Newton (bisection whenever a Newton step leaves the bracket);
4. mixture: log q = (1-α)·log θ + α·log t, normalised;
5. top-k / top-p: the teacher's top-k set, then its top-p nucleus of what is left (vLLM's
   order, the teacher renormalised over its top-k first), restricts q, which is renormalised
   — after step 3, so the restriction does not bias α;
6. draw: one token per row;
7. record: α, log q(y), log t(y) and log θ(y) of the drawn token (tempered distributions,
   i.e. those q was built from).

Where the models agree. For infinitesimally different distributions both sides of the
`kl_symmetry` and `ess_balance` equations are quadratic in the difference and balance at
α = 0.5, and `entropy`'s H_θ/(H_θ + H_t) is 0.5; so α → 0.5 as the models become identical,
and a row whose equation has no resolvable sign at either end of the range (identical
models, or models that agree to float64 rounding) gets that limit: 0.5 clamped to
[alpha_min, alpha_max], on both paths (`fixed` returns `fixed_alpha`, clamped). The
equations are evaluated in float64 from the logits' difference with the common part
cancelled (`LogRatio`), so α keeps its precision down to Var_q(log t − log θ) ~ 1e-12 and
does not depend on the host's SIMD reduction order.

A row the mixing cannot serve (the models share no token, or a logit is NaN) gets α or
log q(y) NaN, never a silent value; `unmixable_rows` finds them and the lockstep raises
`MixingError` naming the row.

Exactness of the draw. The torch code draws by inverse CDF in float64 (a float64 uniform
against the float64 cumulative sum of q), so every token with q(y) ≥ 2⁻⁵³ can be drawn, with
probability q(y) up to float64 rounding. The fused kernels draw y = argmax(log q − log E)
with E ~ Exp(1) per token (the exponential race, equivalent to Gumbel-max), E built from 62
random bits: resolved to 2⁻⁶² near 0 and capped at 16.6 (P(E > 16.6) = 6·10⁻⁸), so a token
is reachable whenever log q(y) ≥ log q(mode) − 47.9 (every token with q(y) ≥ 10⁻¹² is),
and drawn with probability q(y) up to those two limits.

The torch code synchronises with the host only for the Newton convergence check, made once
after a few unconditional iterations and then once per extra iteration; the fused kernels
never do.

Randomness is keyed by identity (JAX's `fold_in`): row i's draw depends on one 63-bit key,
`draw_keys(call seed, the row's own key, the token's position)`, alone; not on the step, the
batch, the engines' row order, admission, preemption or the card. The torch path turns the
key into one float64 uniform on the device; the fused kernels use it as their Philox key. On
CUDA (with Triton, without top-k/top-p,
for the solved methods) steps 1–7 run as fused kernels, one pass over the vocabulary each
(`sampler.fused_mixing`); elsewhere as the torch code below. The same seed repeats the same
output on the same kind of device for the same logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from sampler.errors import ConfigError

#: "auto" (fused kernels on CUDA where they apply), "torch" or "fused"; for benchmarks and tests.
BACKEND = os.environ.get("SAMPLER_MIXING_BACKEND", "auto")

ALPHA_METHODS = ("fixed", "kl_symmetry", "ess_balance", "entropy")
#: Row counts of the captured mixing graphs round up to a multiple of this.
GRAPH_ROW_BUCKET = 16
NEWTON_STEPS_BEFORE_CHECK = 4
#: A gap smaller than this many float64 epsilons times the magnitude of the terms it is
#: computed from is rounding noise: its sign says nothing, so the row has converged.
ROUNDING_SLACK = 16 * torch.finfo(torch.float64).eps
#: While the centred log-ratio h stays within ±SMALL_RATIO, K(s) is summed as expm1 terms.
SMALL_RATIO = 1.0
#: α where the two models agree, for every solved method and `entropy` (module docstring).
IDENTICAL_MODELS_ALPHA = 0.5


@dataclass(frozen=True)
class MixingConfig:
    """How q is formed from the two models' logits."""

    alpha_method: str = "kl_symmetry"
    fixed_alpha: float = 0.5
    alpha_min: float = 0.5
    alpha_max: float = 1.0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    tolerance: float = 1e-6
    #: Cap for the torch path; the fused CUDA path runs a fixed schedule that always meets
    #: `tolerance` (Newton passes, then enough bisection passes for any bracket).
    max_newton_steps: int = 60

    def __post_init__(self) -> None:
        if self.alpha_method not in ALPHA_METHODS:
            raise ConfigError(
                f"alpha_method: unknown method {self.alpha_method!r}; "
                f"choose one of {', '.join(ALPHA_METHODS)}")
        for name in ("alpha_min", "alpha_max", "fixed_alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}: {value} is outside [0, 1]")
        if self.alpha_min > self.alpha_max:
            raise ConfigError(
                f"alpha_min ({self.alpha_min}) is greater than alpha_max ({self.alpha_max})")
        if not self.temperature > 0.0:
            raise ConfigError(
                f"temperature: {self.temperature} must be > 0 (a mixture of two greedy "
                "distributions is undefined)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: {self.top_p} is outside (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"top_k: {self.top_k} must be -1 (off) or a positive count")
        if not self.tolerance > 0.0:
            raise ConfigError(f"tolerance: {self.tolerance} must be > 0")


#: The columns of `MixedDraw.record()`: what is recorded for every generated token.
TRACE_COLUMNS = ("token_id", "alpha", "log_q", "log_teacher", "log_theta")


@dataclass
class MixedDraw:
    """One drawn token per row and what the output records about it."""

    token_ids: torch.Tensor
    alpha: torch.Tensor
    log_q: torch.Tensor
    log_teacher: torch.Tensor
    log_theta: torch.Tensor

    def record(self) -> torch.Tensor:
        """[rows, 5] float64 in `TRACE_COLUMNS`' order, one device tensor so that one copy
        brings a step to the host."""
        return torch.stack([self.token_ids.double(), self.alpha.double(), self.log_q.double(),
                            self.log_teacher.double(), self.log_theta.double()], dim=1)

    def head(self, rows: int) -> MixedDraw:
        return MixedDraw(self.token_ids[:rows], self.alpha[:rows], self.log_q[:rows],
                         self.log_teacher[:rows], self.log_theta[:rows])


def tempered_log_probs(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Log-softmax of logits / T over the first `vocab_size` columns, in float32."""
    return torch.log_softmax(logits[:, :vocab_size].float() / temperature, dim=-1)


@dataclass
class _Tilt:
    """Per entry, for p_s ∝ θ·e^{s·h}: the cumulant K(s) = log E_θ[e^{s·h}], E_{p_s}[h],
    Var_{p_s}[h], and bounds on the float64 rounding of K(s) and of E_{p_s}[h]."""

    cumulant: torch.Tensor
    cumulant_noise: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    mean_noise: torch.Tensor


@dataclass
class LogRatio:
    """Both models on the tokens both allow, in the form that keeps α's equations exact
    where the models nearly agree (float64, per row and per token).

    f = log t − log θ is written h − r: h = (z_t − z_θ)/T − m, the difference of the
    tempered logits centred on its value m at θ's mode, and r = K(1) − κ, K(s) = log E_θ[e^{s·h}]
    (θ renormalised on the support; κ = log t(S) − log θ(S), the log of each model's mass on
    the support S, 0 where they allow the same tokens).
    So f carries rounding relative to its own size. The difference of two log-softmaxes
    carries ε·|log p| instead, which swamps the gaps Δ(α) ≈ Var_q(f)·(α − α*) once Var_q(f) ≲
    1e-6 in float32: the sign of Δ then came from rounding (and from the host's SIMD
    reduction order), and α from an end of the clamp. K(s) is log1p of a sum of expm1 terms
    while |h| ≤ SMALL_RATIO (exact relative to the size of h), a logsumexp beyond (where
    e^{s·h} could overflow and the gaps are large). Float64 per token because float32 weights
    e^{ℓ+s·h} carry ε₃₂ relative rounding, which moves α by ε₃₂/√Var: 0.1 at Var = 1e-12.

    `base` is log θ less its value at the mode (−inf outside the support), `ratio` h (0
    outside); a row without common support or with a NaN logit is `unsolvable`.
    """

    base: torch.Tensor
    ratio: torch.Tensor
    base_mass: torch.Tensor
    small: torch.Tensor
    unsolvable: torch.Tensor
    shift: torch.Tensor | None = None
    shift_noise: torch.Tensor | None = None

    @classmethod
    def of(cls, teacher_logits: torch.Tensor, theta_logits: torch.Tensor, vocab_size: int,
           temperature: float) -> LogRatio:
        teacher = teacher_logits[:, :vocab_size].double() / temperature
        theta = theta_logits[:, :vocab_size].double() / temperature
        has_nan = (teacher.isnan() | theta.isnan()).any(-1)
        teacher = torch.where(teacher.isnan(), 0.0, teacher)
        theta = torch.where(theta.isnan(), 0.0, theta)
        inside = (teacher > float("-inf")) & (theta > float("-inf"))
        mode_value, mode = theta.masked_fill(~inside, float("-inf")).max(-1, keepdim=True)
        unsolvable = has_nan | ~inside.any(-1)
        difference = torch.where(inside, teacher - theta, 0.0)
        ratio = torch.where(inside, difference - difference.gather(-1, mode), 0.0)
        base = torch.where(inside, theta - mode_value.nan_to_num(neginf=0.0), float("-inf"))
        support = cls(base=base, ratio=ratio, base_mass=base.exp().sum(-1),
                      small=ratio.abs().amax(-1) <= SMALL_RATIO, unsolvable=unsolvable)
        unit = support.tilt(torch.ones(ratio.shape[0], dtype=torch.float64,
                                       device=ratio.device))
        # log t and log θ are normalised over every token each allows, not over the support:
        # κ (exactly 0 where both allow the same tokens) adds the log of each one's share.
        share_t = (torch.logsumexp(teacher.masked_fill(~inside, float("-inf")), -1)
                   - torch.logsumexp(teacher, -1))
        share_s = (torch.logsumexp(theta.masked_fill(~inside, float("-inf")), -1)
                   - torch.logsumexp(theta, -1))
        support.shift = unit.cumulant + (share_s - share_t)
        support.shift_noise = unit.cumulant_noise + ROUNDING_SLACK * (share_s - share_t).abs()
        return support

    def tilt(self, s: torch.Tensor) -> _Tilt:
        """`s` holds one tilt per row, or several per row (copies of the rows, stacked)."""
        rows = self.base.shape[0]
        s = s.view(-1, rows, 1)
        base, ratio = self.base[None], self.ratio[None]
        tilted = base + s * ratio
        log_norm = torch.logsumexp(tilted, dim=-1, keepdim=True)
        weights = (tilted - log_norm).exp()
        mean = (weights * ratio).sum(-1)
        variance = (weights * (ratio - mean[..., None]).square()).sum(-1)
        spread = torch.where(weights > 0, (tilted - log_norm).abs(), 0.0)
        mean_noise = ROUNDING_SLACK * (weights * ratio.abs() * (1.0 + spread)).sum(-1)
        base_weights, mass = base.exp(), self.base_mass[None]
        exponent = s * ratio
        series = torch.log1p((base_weights * torch.expm1(exponent)).sum(-1) / mass)
        series_noise = ROUNDING_SLACK * (series.abs() + (
            base_weights * exponent.abs() * (1.0 + base.abs().nan_to_num(posinf=0.0))
        ).sum(-1) / mass)
        direct = log_norm.squeeze(-1) - mass.log()
        direct_noise = ROUNDING_SLACK * (1.0 + direct.abs() + log_norm.squeeze(-1).abs()
                                         + mass.log()
                                         + (weights * torch.where(weights > 0, tilted.abs(),
                                                                  0.0)).sum(-1))
        small = self.small[None]
        return _Tilt(cumulant=torch.where(small, series, direct).reshape(-1),
                     cumulant_noise=torch.where(small, series_noise, direct_noise).reshape(-1),
                     mean=mean.reshape(-1), variance=variance.reshape(-1),
                     mean_noise=mean_noise.reshape(-1))

    def repeat(self, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """r for `copies` stacked copies of the rows, and its rounding bound."""
        return self.shift.repeat(copies), self.shift_noise.repeat(copies)


def _kl_symmetry_gap(support: LogRatio, alpha: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Δ(α) = E_q[f] = E_q[h] − r = KL(q‖θ) − KL(q‖t), dΔ/dα = Var_q(f), and the float64
    rounding error of Δ."""
    tilt = support.tilt(alpha)
    shift, shift_noise = support.repeat(alpha.shape[0] // support.base.shape[0])
    return tilt.mean - shift, tilt.variance, tilt.mean_noise + shift_noise


def _ess_gap(support: LogRatio, alpha: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h(α) = log Σθ²/q − log Σt²/q = K_f(−α) − K_f(2−α) with K_f(s) = K(s) − s·r, so
    h(α) = K(−α) − K(2−α) + 2r; h'(α) = K'(2−α) − K'(−α) ≥ 0; and the rounding error."""
    low, high = support.tilt(-alpha), support.tilt(2.0 - alpha)
    shift, shift_noise = support.repeat(alpha.shape[0] // support.base.shape[0])
    return (low.cumulant - high.cumulant + 2.0 * shift, high.mean - low.mean,
            low.cumulant_noise + high.cumulant_noise + 2.0 * shift_noise)


def identical_models_alpha(lower: float, upper: float) -> float:
    """α where the models agree (module docstring): 0.5, clamped to [lower, upper]."""
    return min(max(IDENTICAL_MODELS_ALPHA, lower), upper)


def _solve_increasing_root(gap, lower: float, upper: float, rows: int, device: torch.device,
                           tolerance: float, max_steps: int) -> torch.Tensor:
    """Root of a per-row increasing function on [lower, upper], clamped to the ends.

    `gap(alpha)` returns (value, slope, rounding error) per entry of `alpha`, which holds one
    value per row, or two (both ends of the bracket, evaluated in one call).

    Safeguarded Newton: a step that leaves the current bracket is replaced by bisection,
    and each evaluation narrows the bracket by the sign of the gap. A row stops when its
    step is below `tolerance` or its gap is below its own rounding error. A row whose gap is
    within its rounding error at both ends has no resolvable sign anywhere: the models agree
    to rounding, and it gets the identical-models α. A row whose gap is not finite at either
    end (no common support, NaN logits) gets α = NaN.
    """
    low = torch.full((rows,), lower, device=device, dtype=torch.float64)
    high = torch.full((rows,), upper, device=device, dtype=torch.float64)
    if lower == upper:
        return low.float()
    ends, _, ends_noise = gap(torch.cat([low, high]))
    gap_low, gap_high = ends[:rows], ends[rows:]
    noise_low, noise_high = ends_noise[:rows], ends_noise[rows:]
    unsolvable = ~(torch.isfinite(gap_low) & torch.isfinite(gap_high))
    agree = (gap_low.abs() <= noise_low) & (gap_high.abs() <= noise_high)
    at_low = (gap_low >= -noise_low) & ~agree
    at_high = (gap_high <= noise_high) & ~at_low & ~agree
    done = at_low | at_high | agree | unsolvable
    span = (gap_high - gap_low).clamp_min(torch.finfo(torch.float64).tiny)
    alpha = torch.where(at_low, low, torch.where(at_high, high,
                                                 low - gap_low * (high - low) / span))
    alpha = alpha.masked_fill(agree, identical_models_alpha(lower, upper))
    alpha = alpha.clamp(lower, upper).masked_fill(unsolvable, float("nan"))
    if bool(done.all()):
        return alpha.float()
    for step in range(max_steps):
        value, slope, noise = gap(alpha)
        high = torch.where(value > 0, alpha, high)
        low = torch.where(value > 0, low, alpha)
        newton = alpha - value / slope.clamp_min(1e-300)
        inside = (newton > low) & (newton < high)
        proposal = torch.where(inside, newton, 0.5 * (low + high))
        converged = (((proposal - alpha).abs() <= tolerance) | ((high - low) <= tolerance)
                     | (value.abs() <= noise))
        alpha = torch.where(done, alpha, torch.where(value.abs() <= noise, alpha, proposal))
        done = done | converged
        if step + 1 >= NEWTON_STEPS_BEFORE_CHECK and bool(done.all()):
            break
    return alpha.float()


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) per row, accurate for nearly one-hot rows in float32.

    With d = log p_top − log p ≥ 0 and r = Σ e^{−d} over every token but the top one,
    H = log1p(r) + Σ e^{−d}·d / (1 + r): positive terms only, where −Σ p·log p would lose
    the top token's share to rounding (its log p rounds to 0 once r < 6e-8).
    """
    top, top_index = log_probs.max(dim=-1, keepdim=True)
    gaps = top - log_probs
    weights = torch.where(log_probs > float("-inf"), (-gaps).exp(), 0.0)
    rest = weights.scatter(-1, top_index, 0.0).sum(-1)
    spread = torch.where(weights > 0, weights * gaps, 0.0).sum(-1)
    return torch.log1p(rest) + spread / (1.0 + rest)


def compute_alpha(teacher_logits: torch.Tensor, theta_logits: torch.Tensor, vocab_size: int,
                  config: MixingConfig) -> torch.Tensor:
    """The teacher's weight α per row (float32), clamped to [alpha_min, alpha_max]."""
    rows, device = teacher_logits.shape[0], teacher_logits.device
    if config.alpha_method == "fixed":
        value = min(max(config.fixed_alpha, config.alpha_min), config.alpha_max)
        return torch.full((rows,), value, device=device)
    if config.alpha_method == "entropy":
        entropy_theta = _entropy(tempered_log_probs(theta_logits, vocab_size, config.temperature))
        entropy_teacher = _entropy(tempered_log_probs(teacher_logits, vocab_size,
                                                      config.temperature))
        total = entropy_theta + entropy_teacher
        alpha = torch.where(total > 0, entropy_theta / total.clamp_min(1e-30),
                            torch.full_like(total, IDENTICAL_MODELS_ALPHA))
        return alpha.clamp(config.alpha_min, config.alpha_max)
    support = LogRatio.of(teacher_logits, theta_logits, vocab_size, config.temperature)
    equation = _kl_symmetry_gap if config.alpha_method == "kl_symmetry" else _ess_gap
    alpha = _solve_increasing_root(lambda a: equation(support, a), config.alpha_min,
                                   config.alpha_max, rows, device, config.tolerance,
                                   config.max_newton_steps)
    return alpha.masked_fill(support.unsolvable, float("nan"))


def teacher_support_mask(log_teacher: torch.Tensor, top_k: int, top_p: float
                         ) -> torch.Tensor | None:
    """Tokens allowed by the teacher's top-k, then top-p, or None when both are off.

    vLLM's order: the top-k set first; the nucleus is then taken over the teacher
    renormalised on that set (the smallest set of most likely tokens whose mass reaches
    top_p; a token is kept while the mass ranked above it is below top_p).
    """
    if top_k == -1 and top_p >= 1.0:
        return None
    keep = torch.ones_like(log_teacher, dtype=torch.bool)
    if top_k != -1 and top_k < log_teacher.shape[-1]:
        kth = torch.topk(log_teacher, top_k, dim=-1).values[:, -1:]
        keep &= log_teacher >= kth
    if top_p < 1.0:
        renormalised = torch.log_softmax(log_teacher.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_log, order = torch.sort(renormalised, dim=-1, descending=True)
        probabilities = sorted_log.exp()
        mass_before = probabilities.cumsum(-1) - probabilities
        keep &= torch.zeros_like(keep).scatter(-1, order, mass_before < top_p)
    return keep


def mixture_log_probs(log_teacher: torch.Tensor, log_theta: torch.Tensor, alpha: torch.Tensor,
                      config: MixingConfig) -> torch.Tensor:
    """Normalised log q for each row over the common support, restricted to the teacher's
    top-k / top-p set if configured."""
    inside = (log_teacher > float("-inf")) & (log_theta > float("-inf"))
    mixed = (1.0 - alpha[:, None]) * log_theta + alpha[:, None] * log_teacher
    keep = teacher_support_mask(log_teacher, config.top_k, config.top_p)
    if keep is not None:
        inside &= keep
    return torch.log_softmax(mixed.masked_fill(~inside, float("-inf")), dim=-1)


_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of each uint64 (a bijection with full avalanche)."""
    values = values + _SPLITMIX_GAMMA
    values = (values ^ (values >> np.uint64(30))) * _SPLITMIX_MULTIPLIERS[0]
    values = (values ^ (values >> np.uint64(27))) * _SPLITMIX_MULTIPLIERS[1]
    return values ^ (values >> np.uint64(31))


def draw_keys(seed: int, row_keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The 63-bit key of each row's draw (int64, non-negative): splitmix64 folded over the
    call's seed, the row's own key and the token's position in the row's output."""
    with np.errstate(over="ignore"):
        state = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
        state = _splitmix64(state ^ np.asarray(row_keys, dtype=np.int64).view(np.uint64))
        state = _splitmix64(state ^ np.asarray(positions, dtype=np.int64).view(np.uint64))
    return (state >> np.uint64(1)).astype(np.int64)


def uniforms_of_keys(keys: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per 63-bit key: its top 53 bits (exact in float64)."""
    return (keys >> 10).double() * 2.0**-53


def draw_from_log_probs(log_q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row, in float64; `uniforms` holds one number in
    [0, 1) per row. Tokens of zero mass are never drawn."""
    cdf = log_q.double().exp().cumsum(-1)
    target = uniforms.double()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(log_q.shape[-1] - 1)


def unmixable_rows(record: np.ndarray) -> np.ndarray:
    """Positions of the rows of a host copy of `MixedDraw.record()` whose α or log q(y) is
    not finite: rows the mixing could not serve."""
    alpha = record[:, TRACE_COLUMNS.index("alpha")]
    log_q = record[:, TRACE_COLUMNS.index("log_q")]
    return np.flatnonzero(~(np.isfinite(alpha) & np.isfinite(log_q)))


def mix_and_draw(teacher_logits: torch.Tensor, theta_logits: torch.Tensor, vocab_size: int,
                 config: MixingConfig, draw_keys: torch.Tensor) -> MixedDraw:
    """Steps 1–7 of the module docstring for a batch of aligned rows; row i's randomness
    is `draw_keys[i]` ([rows] int64 on the logits' device, from `draw_keys`) alone."""
    if _use_fused(teacher_logits, config):
        return _fused_mix_and_draw(teacher_logits, theta_logits, vocab_size, config, draw_keys)
    log_teacher = tempered_log_probs(teacher_logits, vocab_size, config.temperature)
    log_theta = tempered_log_probs(theta_logits, vocab_size, config.temperature)
    alpha = compute_alpha(teacher_logits, theta_logits, vocab_size, config)
    log_q = mixture_log_probs(log_teacher, log_theta, alpha, config)
    tokens = draw_from_log_probs(log_q, uniforms_of_keys(draw_keys.to(log_q.device)))
    picked = tokens[:, None]
    return MixedDraw(
        token_ids=tokens,
        alpha=alpha,
        log_q=log_q.gather(1, picked).squeeze(1),
        log_teacher=log_teacher.gather(1, picked).squeeze(1),
        log_theta=log_theta.gather(1, picked).squeeze(1),
    )


@dataclass
class _CapturedStep:
    graph: torch.cuda.CUDAGraph
    draw: MixedDraw
    record: torch.Tensor


class GraphedMixing:
    """The fused mixing of a step replayed from one CUDA graph per (row bucket, config).

    The fused path is ~60 small kernel launches a step (normalisers, the solver's fixed
    schedule, the draw); launching them cost the host 1–3 ms a step, which the lockstep
    cannot hide where the host bounds the step. Here a step is a few copies and one replay.
    The logits are copied into static buffers (rows past the live ones keep earlier finite
    values; their results are never read) and the draw keys are read from the device, so the
    replayed kernels compute exactly what `mix_and_draw` computes. The returned draw and
    record are static buffers, valid until the next call: the lockstep reads them in stream
    order before then.
    """

    def __init__(self, vocab_size: int, max_rows: int):
        self.vocab_size = vocab_size
        self.capacity = -(-max_rows // GRAPH_ROW_BUCKET) * GRAPH_ROW_BUCKET
        self._layout: tuple | None = None
        self._graphs: dict[tuple[int, MixingConfig], _CapturedStep] = {}

    def applies(self, logits: torch.Tensor, config: MixingConfig) -> bool:
        return logits.is_cuda and _use_fused(logits, config) and logits.shape[0] <= self.capacity

    def __call__(self, teacher_logits: torch.Tensor, theta_logits: torch.Tensor,
                 theta_for_teacher: torch.Tensor | None, config: MixingConfig,
                 draw_keys: torch.Tensor) -> tuple[MixedDraw, torch.Tensor]:
        """`mix_and_draw` of the teacher rows with theta's rows `theta_for_teacher` (None:
        in the same order), and `MixedDraw.record()` of it."""
        rows = teacher_logits.shape[0]
        layout = (teacher_logits.dtype, teacher_logits.shape[1], theta_logits.dtype,
                  theta_logits.shape[1], teacher_logits.device)
        if layout != self._layout:
            self._allocate(layout)
        self._teacher[:rows].copy_(teacher_logits)
        if theta_for_teacher is None:
            self._theta[:rows].copy_(theta_logits)
        else:
            torch.index_select(theta_logits, 0, theta_for_teacher, out=self._theta[:rows])
        self._keys[:rows].copy_(draw_keys)
        bucket = -(-rows // GRAPH_ROW_BUCKET) * GRAPH_ROW_BUCKET
        captured = self._graphs.get((bucket, config)) or self._capture(bucket, config)
        captured.graph.replay()
        return captured.draw.head(rows), captured.record[:rows]

    def _allocate(self, layout: tuple) -> None:
        teacher_dtype, teacher_width, theta_dtype, theta_width, device = layout
        self._graphs.clear()
        self._teacher = torch.zeros(self.capacity, teacher_width, dtype=teacher_dtype,
                                    device=device)
        self._theta = torch.zeros(self.capacity, theta_width, dtype=theta_dtype, device=device)
        self._keys = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self._layout = layout

    def _capture(self, bucket: int, config: MixingConfig) -> _CapturedStep:
        def step() -> tuple[MixedDraw, torch.Tensor]:
            draw = _fused_mix_and_draw(self._teacher[:bucket], self._theta[:bucket],
                                       self.vocab_size, config, self._keys[:bucket])
            return draw, draw.record()

        step()  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            draw, record = step()
        captured = self._graphs[(bucket, config)] = _CapturedStep(graph, draw, record)
        return captured


def _use_fused(logits: torch.Tensor, config: MixingConfig) -> bool:
    if BACKEND == "torch":
        return False
    applies = (config.alpha_method != "entropy" and config.top_k == -1 and config.top_p >= 1.0)
    if BACKEND == "fused":
        return applies
    return applies and logits.is_cuda


def _fused_mix_and_draw(teacher_logits: torch.Tensor, theta_logits: torch.Tensor,
                        vocab_size: int, config: MixingConfig,
                        draw_keys: torch.Tensor) -> MixedDraw:
    """Steps 1–7 by the fused kernels: no host synchronisation at all."""
    from sampler import fused_mixing

    temperature, rows = config.temperature, teacher_logits.shape[0]
    norms = fused_mixing.log_normalisers(teacher_logits, theta_logits, vocab_size, temperature)
    if config.alpha_method == "fixed":
        value = min(max(config.fixed_alpha, config.alpha_min), config.alpha_max)
        alpha = torch.full((rows,), value, device=teacher_logits.device)
    else:
        alpha = fused_mixing.solve_alpha(
            teacher_logits, theta_logits, vocab_size, temperature, config.alpha_method,
            config.alpha_min, config.alpha_max, config.tolerance, ROUNDING_SLACK, SMALL_RATIO,
            identical_models_alpha(config.alpha_min, config.alpha_max))
    tokens, log_q, log_teacher, log_theta = fused_mixing.draw(
        teacher_logits, theta_logits, vocab_size, temperature, norms, alpha, draw_keys)
    return MixedDraw(token_ids=tokens, alpha=alpha, log_q=log_q, log_teacher=log_teacher,
                     log_theta=log_theta)
