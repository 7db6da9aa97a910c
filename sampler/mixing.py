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

Randomness is (seed, rank): one seed per step and each row's rank in pair order, so a row's
draw does not depend on the engine's row order. On CUDA (with Triton, without top-k/top-p,
for the solved methods) steps 1–7 run as fused kernels, one pass over the vocabulary each
(`sampler.fused_mixing`); elsewhere as the torch code below. The same seed repeats the same
output on the same kind of device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sampler.errors import ConfigError

#: "auto" (fused kernels on CUDA where they apply), "torch" or "fused"; for benchmarks and tests.
BACKEND = os.environ.get("SAMPLER_MIXING_BACKEND", "auto")

ALPHA_METHODS = ("fixed", "kl_symmetry", "ess_balance", "entropy")
#: Row counts of the captured mixing graphs round up to a multiple of this.
GRAPH_ROW_BUCKET = 16
NEWTON_STEPS_BEFORE_CHECK = 4
#: A gap smaller than this many float32 epsilons times the magnitude of the terms it is
#: summed from is rounding noise: its sign says nothing, so the row has converged.
ROUNDING_SLACK = 8 * torch.finfo(torch.float32).eps


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


@dataclass
class MixedDraw:
    """One drawn token per row and what the output records about it."""

    token_ids: torch.Tensor
    alpha: torch.Tensor
    log_q: torch.Tensor
    log_teacher: torch.Tensor
    log_theta: torch.Tensor

    def record(self) -> torch.Tensor:
        """[rows, 5] float64: token id, α, log q(y), log t(y), log θ(y) (the lockstep's
        TRACE_COLUMNS), one device tensor so that one copy brings a step to the host."""
        return torch.stack([self.token_ids.double(), self.alpha.double(), self.log_q.double(),
                            self.log_teacher.double(), self.log_theta.double()], dim=1)

    def head(self, rows: int) -> MixedDraw:
        return MixedDraw(self.token_ids[:rows], self.alpha[:rows], self.log_q[:rows],
                         self.log_teacher[:rows], self.log_theta[:rows])


def tempered_log_probs(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Log-softmax of logits / T over the first `vocab_size` columns, in float32."""
    return torch.log_softmax(logits[:, :vocab_size].float() / temperature, dim=-1)


@dataclass
class CommonSupport:
    """Both models' log-probs restricted to the tokens both allow.

    `log_theta` is −inf outside the support and `log_ratio` (log t − log θ) is 0 there, so
    that sums over the vocabulary are sums over the support with no inf − inf; `magnitude`
    (|log t| + |log θ| inside, 0 outside) bounds the float32 rounding of those sums.
    """

    log_theta: torch.Tensor
    log_ratio: torch.Tensor
    magnitude: torch.Tensor

    @classmethod
    def of(cls, log_teacher: torch.Tensor, log_theta: torch.Tensor) -> CommonSupport:
        inside = (log_teacher > float("-inf")) & (log_theta > float("-inf"))
        return cls(log_theta=log_theta.masked_fill(~inside, float("-inf")),
                   log_ratio=torch.where(inside, log_teacher - log_theta, 0.0),
                   magnitude=torch.where(inside, log_teacher.abs() + log_theta.abs(), 0.0))

    def repeat(self, copies: int) -> CommonSupport:
        return CommonSupport(self.log_theta.repeat(copies, 1), self.log_ratio.repeat(copies, 1),
                             self.magnitude.repeat(copies, 1))


def _kl_symmetry_gap(support: CommonSupport, alpha: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Δ(α) = E_q[log t − log θ] = KL(q‖θ) − KL(q‖t), dΔ/dα = Var_q(log t − log θ), and the
    float32 rounding error of Δ (from rounding in log θ and log t, weighted by q)."""
    log_q = torch.log_softmax(support.log_theta + alpha[:, None] * support.log_ratio, dim=-1)
    q = log_q.exp()
    mean = (q * support.log_ratio).sum(-1)
    variance = (q * (support.log_ratio - mean[:, None]).square()).sum(-1)
    return mean, variance, ROUNDING_SLACK * (q * support.magnitude).sum(-1)


def _tilted_mean(support: CommonSupport, s: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K(s) = log E_θ[e^{s·f}], K'(s) = E_{p_s}[f] with p_s ∝ θ·e^{s·f}, and K's rounding
    error; f = log t − log θ, sums over the common support."""
    tilted = support.log_theta + s[:, None] * support.log_ratio
    log_norm = torch.logsumexp(tilted, dim=-1)
    weights = (tilted - log_norm[:, None]).exp()
    mean = (weights * support.log_ratio).sum(-1)
    magnitude = (weights * torch.where(weights > 0, tilted.abs(), 0.0)).sum(-1)
    return log_norm, mean, ROUNDING_SLACK * magnitude


def _ess_gap(support: CommonSupport, alpha: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h(α) = log Σθ²/q − log Σt²/q = K(−α) − K(2−α), h'(α) = K'(2−α) − K'(−α) ≥ 0, error."""
    k_low, mean_low, noise_low = _tilted_mean(support, -alpha)
    k_high, mean_high, noise_high = _tilted_mean(support, 2.0 - alpha)
    return k_low - k_high, mean_high - mean_low, noise_low + noise_high


def _solve_increasing_root(gap, lower: float, upper: float, rows: int, device: torch.device,
                           tolerance: float, max_steps: int) -> torch.Tensor:
    """Root of a per-row increasing function on [lower, upper], clamped to the ends.

    `gap(alpha)` returns (value, slope, rounding error) per entry of `alpha`, which holds one
    value per row, or two (both ends of the bracket, evaluated in one call).

    Safeguarded Newton: a step that leaves the current bracket is replaced by bisection,
    and each evaluation narrows the bracket by the sign of the gap. A row stops when its
    step is below `tolerance` or its gap is below its own float32 rounding error. A row whose
    gap is not finite at either end (no common support, NaN logits) gets α = NaN.
    """
    low = torch.full((rows,), lower, device=device)
    high = torch.full((rows,), upper, device=device)
    if lower == upper:
        return low
    ends, _, ends_noise = gap(torch.cat([low, high]))
    gap_low, gap_high = ends[:rows], ends[rows:]
    noise_low, noise_high = ends_noise[:rows], ends_noise[rows:]
    unsolvable = ~(torch.isfinite(gap_low) & torch.isfinite(gap_high))
    at_low = gap_low >= -noise_low
    at_high = (gap_high <= noise_high) & ~at_low
    done = at_low | at_high | unsolvable
    span = (gap_high - gap_low).clamp_min(torch.finfo(torch.float32).tiny)
    alpha = torch.where(done, torch.where(at_low, low, high), low - gap_low * (high - low) / span)
    alpha = alpha.clamp(lower, upper).masked_fill(unsolvable, float("nan"))
    if bool(done.all()):
        return alpha
    for step in range(max_steps):
        value, slope, noise = gap(alpha)
        high = torch.where(value > 0, alpha, high)
        low = torch.where(value > 0, low, alpha)
        newton = alpha - value / slope.clamp_min(1e-30)
        inside = (newton > low) & (newton < high)
        proposal = torch.where(inside, newton, 0.5 * (low + high))
        converged = (((proposal - alpha).abs() <= tolerance) | ((high - low) <= tolerance)
                     | (value.abs() <= noise))
        alpha = torch.where(done, alpha, torch.where(value.abs() <= noise, alpha, proposal))
        done = done | converged
        if step + 1 >= NEWTON_STEPS_BEFORE_CHECK and bool(done.all()):
            break
    return alpha


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


def compute_alpha(log_teacher: torch.Tensor, log_theta: torch.Tensor, config: MixingConfig
                  ) -> torch.Tensor:
    """The teacher's weight α per row, clamped to [alpha_min, alpha_max]."""
    rows, device = log_teacher.shape[0], log_teacher.device
    if config.alpha_method == "fixed":
        value = min(max(config.fixed_alpha, config.alpha_min), config.alpha_max)
        return torch.full((rows,), value, device=device)
    if config.alpha_method == "entropy":
        entropy_theta, entropy_teacher = _entropy(log_theta), _entropy(log_teacher)
        total = entropy_theta + entropy_teacher
        alpha = torch.where(total > 0, entropy_theta / total.clamp_min(1e-30),
                            torch.full_like(total, 0.5))
        return alpha.clamp(config.alpha_min, config.alpha_max)
    support = CommonSupport.of(log_teacher, log_theta)
    equation = _kl_symmetry_gap if config.alpha_method == "kl_symmetry" else _ess_gap

    def gap(alpha: torch.Tensor):
        copies = alpha.shape[0] // rows
        return equation(support if copies == 1 else support.repeat(copies), alpha)

    return _solve_increasing_root(gap, config.alpha_min, config.alpha_max, rows, device,
                                  config.tolerance, config.max_newton_steps)


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


def draw_from_log_probs(log_q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row, in float64; `uniforms` holds one number in
    [0, 1) per row. Tokens of zero mass are never drawn."""
    cdf = log_q.double().exp().cumsum(-1)
    target = uniforms.double()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(log_q.shape[-1] - 1)


def unmixable_rows(alpha: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Positions of rows whose α or log q(y) is not finite: rows the mixing could not serve."""
    return torch.nonzero(~(torch.isfinite(alpha) & torch.isfinite(log_q))).flatten()


def mix_and_draw(teacher_logits: torch.Tensor, theta_logits: torch.Tensor, vocab_size: int,
                 config: MixingConfig, seed: int, ranks: torch.Tensor) -> MixedDraw:
    """Steps 1–7 of the module docstring for a batch of aligned rows."""
    if _use_fused(teacher_logits, config):
        return _fused_mix_and_draw(teacher_logits, theta_logits, vocab_size, config, seed, ranks)
    log_teacher = tempered_log_probs(teacher_logits, vocab_size, config.temperature)
    log_theta = tempered_log_probs(theta_logits, vocab_size, config.temperature)
    alpha = compute_alpha(log_teacher, log_theta, config)
    log_q = mixture_log_probs(log_teacher, log_theta, alpha, config)
    generator = torch.Generator(device=log_q.device).manual_seed(seed)
    uniforms = torch.rand(len(ranks), generator=generator, device=log_q.device,
                          dtype=torch.float64)[ranks]
    tokens = draw_from_log_probs(log_q, uniforms)
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
    values; their results are never read) and the seed is read from the device, so the
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
                 theta_for_teacher: torch.Tensor | None, config: MixingConfig, seed: int,
                 ranks: torch.Tensor) -> tuple[MixedDraw, torch.Tensor]:
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
        self._ranks[:rows].copy_(ranks)
        self._seed.fill_(seed)
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
        self._ranks = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self._seed = torch.zeros(1, dtype=torch.long, device=device)
        self._layout = layout

    def _capture(self, bucket: int, config: MixingConfig) -> _CapturedStep:
        def step() -> tuple[MixedDraw, torch.Tensor]:
            draw = _fused_mix_and_draw(self._teacher[:bucket], self._theta[:bucket],
                                       self.vocab_size, config, self._seed, self._ranks[:bucket])
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
                        vocab_size: int, config: MixingConfig, seed: int | torch.Tensor,
                        ranks: torch.Tensor) -> MixedDraw:
    """Steps 1–7 by the fused kernels: no host synchronisation at all (`seed` may be a [1]
    int64 device tensor)."""
    from sampler import fused_mixing

    temperature, rows = config.temperature, teacher_logits.shape[0]
    norms = fused_mixing.log_normalisers(teacher_logits, theta_logits, vocab_size, temperature)
    if config.alpha_method == "fixed":
        value = min(max(config.fixed_alpha, config.alpha_min), config.alpha_max)
        alpha = torch.full((rows,), value, device=teacher_logits.device)
    else:
        alpha = fused_mixing.solve_alpha(teacher_logits, theta_logits, vocab_size, temperature,
                                         norms, config.alpha_method, config.alpha_min,
                                         config.alpha_max, config.tolerance, ROUNDING_SLACK)
    tokens, log_q, log_teacher, log_theta = fused_mixing.draw(
        teacher_logits, theta_logits, vocab_size, temperature, norms, alpha, ranks, seed)
    return MixedDraw(token_ids=tokens, alpha=alpha, log_q=log_q, log_teacher=log_teacher,
                     log_theta=log_theta)
