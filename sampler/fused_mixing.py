"""Fused Triton kernels for the mixing step on CUDA: no [rows, vocab] intermediates, no host sync.

Same math as `sampler.mixing`. Each row's vocabulary is split into chunks of `CHUNK` columns,
one program per (row, chunk), so a batch of a few hundred rows still fills the card; a second,
small kernel per pass merges a row's chunk partials (two-stage reduction).

- `log_normalisers`: logsumexp of both models' tempered logits;
- `solve_alpha`: the α of `kl_symmetry` or `ess_balance`, by the safeguarded Newton rule of
  `sampler.mixing._solve_increasing_root` run entirely on the device, on the float64 form of
  the equations (`sampler.mixing.LogRatio`: f = h − r, h the centred difference of the
  logits). A centre pass finds θ's mode, m and each model's mass on the support, a float64
  pass at tilt 1 gives r; then each pass reads both models' logits once and returns, for
  p_s ∝ θ·e^{s·h} (so p_α = q_α), K(s), E[h], Var[h] (merged Welford-style) and the
  magnitudes that bound their rounding, as [rows, chunks, 10] float64 partials; the merge
  kernel applies the Newton/bisection update in place. A fixed launch schedule
  (`NEWTON_STEPS` Newton passes, then bisection passes enough to shrink any bracket below the
  tolerance) replaces the host's convergence checks; finished rows skip their passes.

  Two tiers. Float64 exp has no fast path on a GPU: with it per token the solver cost
  4.17 ms a step (kl_symmetry, one H200, 256 × 152,064 bf16) against 1.44–1.97 in float32.
  So the schedule runs first with float32 weights: h, the tilted log-weights x and every
  sum stay float64 (the cancellation f = h − r is kept; the centre and r are float64
  passes), only e^x is float32, by exp2 with the argument's rounding put back, so each
  weight is off by at most 2ε₃₂ relative whatever |x|. Then E[h] is off by at most
  2ε₃₂·√Var[h] and K(s) by 2ε₃₂, and α by that over the slope (≈ 2ε₃₂/√Var_q(f) for kl). A
  row is settled there when that bound (`FLOAT32_SLACK`: a safety factor 2) moves α by at
  most the tolerance: Var_q(f) ≳ 0.25 (kl), 0.5 (ess). The others are marked, and the same
  schedule runs again with float64 weights, each program first reading its row's mark and
  returning at once for a settled row: from the ends for models that agree to float32
  rounding (or unsolvable rows), else resumed from the float32 bracket and α (narrowed by
  resolved signs only). Fixed grids, no host synchronisation: graph capture holds. About
  twice the launches, which a captured graph hides. Measured (H200, 256 × 152,064 bf16,
  solve_alpha alone, graphed, against the all-float64 solver in the same call): kl 5.46 →
  2.52 ms, ess 8.74 → 3.52 on independent logits; near-identical (θ = t·(1 + 1e-6), every
  row re-solved) kl 6.70 → 4.67, ess 11.35 → 12.37; α within 4.2e-7 of the float64 one;
- `draw`: y = argmax(log q − log E), E ~ Exp(1) per token (the exponential race, i.e.
  Gumbel-max) from Philox keyed by the row's 63-bit draw key (`sampler.mixing.draw_keys`) at
  counter = the token id, so a row's draw depends on its key alone: not on its row
  position, the batch or the chunking; and the recorded log q(y), log t(y), log θ(y).
  `sampler.mixing` states the exactness of this draw.

Every sum runs over the tokens both models allow (a −inf logit in either model gives q = 0),
and every running maximum is guarded, so a block far below the row's maximum (low
temperature) or wholly outside the support adds zero weight instead of 0/0. A row that has no
common support or a NaN logit ends with α or log q(y) NaN, which the lockstep reports.

`benchmarks/mixing_step.py` times a step per method, for separated and near-identical models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: Columns each program reduces, and columns per loop iteration inside a program.
CHUNK = 8192
BLOCK = 1024
#: The float32 schedule's counterpart of `sampler.mixing.ROUNDING_SLACK`: ε₃₂ = 2⁻²³ with a
#: safety factor of 2, times the bounds of `_merged_moments`.
FLOAT32_SLACK = 2.0 * 2.0**-23
#: Relative rounding of a float32 weight in ε₃₂ (`_exp_float32`: exp2's error, ≤ 2 ulp).
WEIGHT_ROUNDING = tl.constexpr(2.0)
LOG2_E = tl.constexpr(1.4426950408889634)
LN_2 = tl.constexpr(0.6931471805599453)
#: Marks of the rows the float32 schedule leaves to float64: all over again, or on from the
#: bracket and α where the float32 gap fell within its rounding.
REDO_FROM_ENDS = tl.constexpr(1)
REDO_FROM_BRACKET = tl.constexpr(2)
#: Newton passes before the solver switches to bisection (rows converge in ~3–6).
NEWTON_STEPS = 8
#: Values stored per (entry, chunk) by the moments pass.
MOMENT_FIELDS = tl.constexpr(10)
#: Largest float32 below 1: caps the uniform behind the exponential noise (E ≤ 16.6).
BELOW_ONE = tl.constexpr(1.0 - 2.0**-24)
#: Below this, −log(1 − u) is computed by its series (1 − u would round to 1 in float32).
SERIES_BELOW = tl.constexpr(1e-4)
#: 2⁻³¹ and 2⁻³²: `tl.rand` gives multiples of 2⁻³¹; a second draw fills the bits below.
TWO_TO_MINUS_31 = tl.constexpr(2.0**-31)
TWO_TO_MINUS_32 = tl.constexpr(2.0**-32)


@triton.jit
def _guarded(maximum):
    """A running maximum usable as a shift: 0 while no finite value has been seen."""
    return tl.where(maximum == float("-inf"), 0.0, maximum)


@triton.jit
def _normaliser_partials_kernel(teacher, theta, stride_t, stride_s, vocab, inv_temperature,
                                partials, CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    max_t = tl.full([], float("-inf"), tl.float32)
    max_s = tl.full([], float("-inf"), tl.float32)
    sum_t = tl.zeros([], tl.float32)
    sum_s = tl.zeros([], tl.float32)
    for start in range(chunk * CHUNK_SIZE, tl.minimum((chunk + 1) * CHUNK_SIZE, vocab),
                       BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab
        zt = tl.load(teacher + row * stride_t + cols, mask=mask,
                     other=float("-inf")).to(tl.float32) * inv_temperature
        zs = tl.load(theta + row * stride_s + cols, mask=mask,
                     other=float("-inf")).to(tl.float32) * inv_temperature
        new_t = tl.maximum(max_t, tl.max(zt, 0))
        new_s = tl.maximum(max_s, tl.max(zs, 0))
        shift_t, shift_s = _guarded(new_t), _guarded(new_s)
        sum_t = sum_t * tl.exp(max_t - shift_t) + tl.sum(tl.exp(zt - shift_t), 0)
        sum_s = sum_s * tl.exp(max_s - shift_s) + tl.sum(tl.exp(zs - shift_s), 0)
        max_t, max_s = new_t, new_s
    base = partials + (row * chunks + chunk) * 4
    tl.store(base + 0, max_t)
    tl.store(base + 1, sum_t)
    tl.store(base + 2, max_s)
    tl.store(base + 3, sum_s)


@triton.jit
def _merge_logsumexp(maxima, sums):
    top = _guarded(tl.max(maxima, 0))
    return top + tl.log(tl.sum(sums * tl.exp(maxima - top), 0))


@triton.jit
def _normaliser_merge_kernel(partials, chunks, out_t, out_s, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, CHUNKS_P2)
    mask = offsets < chunks
    base = partials + (row * chunks + offsets) * 4
    max_t = tl.load(base + 0, mask=mask, other=float("-inf"))
    sum_t = tl.load(base + 1, mask=mask, other=0.0)
    max_s = tl.load(base + 2, mask=mask, other=float("-inf"))
    sum_s = tl.load(base + 3, mask=mask, other=0.0)
    tl.store(out_t + row, _merge_logsumexp(max_t, sum_t))
    tl.store(out_s + row, _merge_logsumexp(max_s, sum_s))


@triton.jit
def _tempered_log_probs(teacher, theta, stride_t, stride_s, row, cols, mask, inv_temperature,
                        norm_teacher, norm_theta):
    """log t and log θ of one block of a row, and where both are finite (the common
    support, within the vocabulary); log t and log θ are 0 outside it."""
    lt = tl.load(teacher + row * stride_t + cols, mask=mask,
                 other=0.0).to(tl.float32) * inv_temperature - norm_teacher
    ls = tl.load(theta + row * stride_s + cols, mask=mask,
                 other=0.0).to(tl.float32) * inv_temperature - norm_theta
    inside = mask & (lt > float("-inf")) & (ls > float("-inf"))
    return tl.where(inside, lt, 0.0), tl.where(inside, ls, 0.0), inside


@triton.jit
def _tempered_logits(teacher, theta, stride_t, stride_s, row, cols, mask, inv_temperature):
    """θ's tempered logits a and the difference g = (z_t − z_θ)/T of one block, in float64;
    `inside`: within the vocabulary and finite in both models (NaN counts as inside)."""
    zt = tl.load(teacher + row * stride_t + cols, mask=mask, other=0.0).to(tl.float64)
    zs = tl.load(theta + row * stride_s + cols, mask=mask, other=0.0).to(tl.float64)
    inside = mask & (zt != float("-inf")) & (zs != float("-inf"))
    return zs * inv_temperature, tl.where(inside, (zt - zs) * inv_temperature, 0.0), inside


@triton.jit
def _logsumexp_step(running_max, total, values):
    """One block of an online logsumexp: the new (maximum, sum of e^{value − maximum})."""
    new_max = tl.maximum(running_max, tl.max(values, 0))
    shift = _guarded(new_max)
    return new_max, total * tl.exp(running_max - shift) + tl.sum(tl.exp(values - shift), 0)


#: Values per (row, chunk) of the centre pass: θ's best logit, g there, NaN count, and
#: (maximum, sum) of four logsumexps (each model over all its tokens and over the support).
CENTRE_FIELDS = tl.constexpr(11)


@triton.jit
def _centre_partials_kernel(teacher, theta, stride_t, stride_s, vocab, inv_temperature,
                            partials, CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per (row, chunk): θ's largest tempered logit on the common support, g there, whether
    a logit is NaN, and the logsumexps that give each model's mass on the support."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    best = tl.full([], float("-inf"), tl.float64)
    centre = tl.zeros([], tl.float64)
    nans = tl.zeros([], tl.float64)
    maxima_t = tl.full([], float("-inf"), tl.float64)
    maxima_ts = tl.full([], float("-inf"), tl.float64)
    maxima_s = tl.full([], float("-inf"), tl.float64)
    maxima_ss = tl.full([], float("-inf"), tl.float64)
    sum_t = tl.zeros([], tl.float64)
    sum_ts = tl.zeros([], tl.float64)
    sum_s = tl.zeros([], tl.float64)
    sum_ss = tl.zeros([], tl.float64)
    for start in range(chunk * CHUNK_SIZE, tl.minimum((chunk + 1) * CHUNK_SIZE, vocab),
                       BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab
        a, g, inside = _tempered_logits(teacher, theta, stride_t, stride_s, row, cols, mask,
                                        inv_temperature)
        zt = tl.load(teacher + row * stride_t + cols, mask=mask,
                     other=float("-inf")).to(tl.float64) * inv_temperature
        nans += tl.sum(tl.where(mask & ((zt != zt) | (a != a)), 1.0, 0.0), 0)
        masked = tl.where(inside & (a == a), a, float("-inf"))
        block_best = tl.max(masked, 0)
        block_centre = tl.sum(tl.where(cols == tl.argmax(masked, 0) + start, g, 0.0), 0)
        better = block_best > best
        centre = tl.where(better, block_centre, centre)
        best = tl.where(better, block_best, best)
        zs = tl.where(mask, a, float("-inf"))
        maxima_t, sum_t = _logsumexp_step(maxima_t, sum_t, zt)
        maxima_ts, sum_ts = _logsumexp_step(maxima_ts, sum_ts, tl.where(inside, zt, float("-inf")))
        maxima_s, sum_s = _logsumexp_step(maxima_s, sum_s, zs)
        maxima_ss, sum_ss = _logsumexp_step(maxima_ss, sum_ss, tl.where(inside, zs, float("-inf")))
    base = partials + (row * chunks + chunk) * CENTRE_FIELDS
    tl.store(base + 0, best)
    tl.store(base + 1, centre)
    tl.store(base + 2, nans)
    tl.store(base + 3, maxima_t)
    tl.store(base + 4, sum_t)
    tl.store(base + 5, maxima_ts)
    tl.store(base + 6, sum_ts)
    tl.store(base + 7, maxima_s)
    tl.store(base + 8, sum_s)
    tl.store(base + 9, maxima_ss)
    tl.store(base + 10, sum_ss)


@triton.jit
def _merged_logsumexp(base, offsets_mask, field):
    return _merge_logsumexp(tl.load(base + field, mask=offsets_mask, other=float("-inf")),
                            tl.load(base + field + 1, mask=offsets_mask, other=0.0))


@triton.jit
def _centre_merge_kernel(partials, chunks, mode, centre, share, CHUNKS_P2: tl.constexpr):
    """θ's mode value, the centre m = g at θ's mode, and κ = log t(S) − log θ(S) (each
    model's mass on the support S; exactly 0 where both allow the same tokens); m is NaN for
    a row that cannot be solved (no common support or a NaN logit), which makes its gaps NaN."""
    row = tl.program_id(0)
    offsets = tl.arange(0, CHUNKS_P2)
    mask = offsets < chunks
    base = partials + (row * chunks + offsets) * CENTRE_FIELDS
    bests = tl.load(base + 0, mask=mask, other=float("-inf"))
    centres = tl.load(base + 1, mask=mask, other=0.0)
    nans = tl.sum(tl.load(base + 2, mask=mask, other=0.0), 0)
    winner = tl.argmax(bests, 0)
    best = tl.max(bests, 0)
    value = tl.sum(tl.where(offsets == winner, centres, 0.0), 0)
    unsolvable = (nans > 0) | (best == float("-inf"))
    share_t = _merged_logsumexp(base, mask, 5) - _merged_logsumexp(base, mask, 3)
    share_s = _merged_logsumexp(base, mask, 9) - _merged_logsumexp(base, mask, 7)
    tl.store(mode + row, tl.where(best == float("-inf"), 0.0, best))
    tl.store(centre + row, tl.where(unsolvable, float("nan"), value))
    tl.store(share + row, tl.where(unsolvable, 0.0, share_t - share_s))


@triton.jit
def _expm1(y):
    """e^y − 1 to float64 precision relative to y (series below 1e-2, error y⁶/5040)."""
    series = y * (1.0 + y * 0.5 * (1.0 + y / 3.0 * (1.0 + y * 0.25 * (1.0 + y * 0.2 * (
        1.0 + y / 6.0)))))
    return tl.where(tl.abs(y) < 1e-2, series, tl.exp(y) - 1.0)


@triton.jit
def _exp_float32(y):
    """e^y of a float64 y ≤ 0 (or −inf) by float32's exp2, the argument's float32 rounding
    put back in float64: relative error within WEIGHT_ROUNDING·ε₃₂ whatever |y|."""
    t = y * LOG2_E
    t32 = t.to(tl.float32)
    residual = tl.where(t > float("-inf"), (t - t32.to(tl.float64)) * LN_2, 0.0)
    return tl.exp2(t32).to(tl.float64) * (1.0 + residual)


@triton.jit
def _log1p(v):
    """log(1 + v) to float64 precision relative to v (the correction of log(u)/(u − 1))."""
    u = 1.0 + v
    return tl.where(u == 1.0, v, tl.log(u) * v / (u - 1.0))


@triton.jit
def _moment_partials_kernel(teacher, theta, stride_t, stride_s, vocab, rows, inv_temperature,
                            mode, centre, points, point_count, done, partials,
                            ESS: tl.constexpr, FLOAT32_WEIGHTS: tl.constexpr,
                            CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Entry e = j·point_count + point: tilt s = α_point (kl) or 2j − α_point (ess, j ∈ {0,1}),
    of p_s ∝ θ·e^{s·h}, h = g − m (`sampler.mixing.LogRatio`): h, the tilted log-weights
    and every sum in float64; with FLOAT32_WEIGHTS the weights by `_exp_float32`, the
    magnitudes those of its rounding, and no θ mass or expm1 series (`_merged_moments`)."""
    entry = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    point = entry % point_count
    row = point % rows
    if tl.load(done + row) != 0:
        return
    alpha = tl.load(points + point).to(tl.float64)
    if ESS:
        s = 2.0 * (entry // point_count) - alpha
    else:
        s = alpha
    row_mode = tl.load(mode + row)
    row_centre = tl.load(centre + row)
    running_max = tl.full([], float("-inf"), tl.float64)
    weight = tl.zeros([], tl.float64)
    mean = tl.zeros([], tl.float64)
    m2 = tl.zeros([], tl.float64)
    ratio_magnitude = tl.zeros([], tl.float64)
    tilt_magnitude = tl.zeros([], tl.float64)
    series = tl.zeros([], tl.float64)
    series_magnitude = tl.zeros([], tl.float64)
    largest_ratio = tl.zeros([], tl.float64)
    mass = tl.zeros([], tl.float64)
    for start in range(chunk * CHUNK_SIZE, tl.minimum((chunk + 1) * CHUNK_SIZE, vocab),
                       BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        a, g, inside = _tempered_logits(teacher, theta, stride_t, stride_s, row, cols,
                                        cols < vocab, inv_temperature)
        h = tl.where(inside, g - row_centre, 0.0)
        log_base = tl.where(inside, a - row_mode, float("-inf"))
        x = log_base + s * h
        new_max = tl.maximum(running_max, tl.max(x, 0))
        shift = _guarded(new_max)
        scale = tl.exp(running_max - shift)
        if FLOAT32_WEIGHTS:
            w = _exp_float32(x - shift)
        else:
            w = tl.exp(x - shift)
        block_weight = tl.sum(w, 0)
        block_mean = tl.sum(w * h, 0) / tl.maximum(block_weight, 1e-300)
        block_m2 = tl.sum(w * (h - block_mean) * (h - block_mean), 0)
        weight = weight * scale
        m2 = m2 * scale
        total = weight + block_weight
        share = block_weight / tl.maximum(total, 1e-300)
        delta = block_mean - mean
        new_mean = mean + delta * share
        if not FLOAT32_WEIGHTS:
            absolute_x = tl.where(inside, tl.abs(x), 0.0)
            ratio_magnitude = ratio_magnitude * scale \
                + tl.sum(w * tl.abs(h) * (1.0 + absolute_x), 0)
            tilt_magnitude = tilt_magnitude * scale + tl.sum(w * absolute_x, 0)
            exponent = s * h
            base_weight = tl.exp(log_base)
            series += tl.sum(tl.where(inside, base_weight * _expm1(exponent), 0.0), 0)
            series_magnitude += tl.sum(tl.where(inside, base_weight * tl.abs(exponent) * (
                1.0 + tl.abs(log_base)), 0.0), 0)
            mass += tl.sum(base_weight, 0)
        mean = new_mean
        m2 = m2 + block_m2 + delta * delta * weight * share
        weight = total
        running_max = new_max
        largest_ratio = tl.maximum(largest_ratio, tl.max(tl.abs(h), 0))
    base = partials + (entry * chunks + chunk) * MOMENT_FIELDS
    tl.store(base + 0, running_max)
    tl.store(base + 1, weight)
    tl.store(base + 2, mean)
    tl.store(base + 3, m2)
    tl.store(base + 4, ratio_magnitude)
    tl.store(base + 5, tilt_magnitude)
    tl.store(base + 6, series)
    tl.store(base + 7, series_magnitude)
    tl.store(base + 8, largest_ratio)
    tl.store(base + 9, mass)


@triton.jit
def _merged_moments(partials, entry, chunks, slack, small_ratio, FLOAT32_WEIGHTS: tl.constexpr,
                    CHUNKS_P2: tl.constexpr):
    """(K(s), its rounding bound, E[h], Var[h], E[h]'s rounding bound) of one entry from its
    chunk partials: K(s) by log1p of the expm1 sum while |h| ≤ small_ratio, else by
    logsumexp (`sampler.mixing.LogRatio.tilt`). With FLOAT32_WEIGHTS (`slack` then per ε₃₂)
    the bounds are those of the weights' relative rounding |δ| ≤ WEIGHT_ROUNDING·ε₃₂:
    |ΔE[h]| ≤ E[|δ|·|h − E[h]|] ≤ max |δ|·√Var[h] and |Δ log Σw| ≤ max |δ|; K(s) comes
    plus the log of θ's mass on the support (a constant of the row, which cancels in
    K(−α) − K(2−α), the only use of K there); no expm1 series (its bound is infinite: rows
    with every |h| ≤ small_ratio go to float64)."""
    offsets = tl.arange(0, CHUNKS_P2)
    mask = offsets < chunks
    base = partials + (entry * chunks + offsets) * MOMENT_FIELDS
    maxima = tl.load(base + 0, mask=mask, other=float("-inf"))
    weights = tl.load(base + 1, mask=mask, other=0.0)
    means = tl.load(base + 2, mask=mask, other=0.0)
    m2s = tl.load(base + 3, mask=mask, other=0.0)
    top = _guarded(tl.max(maxima, 0))
    scale = tl.where(mask, tl.exp(maxima - top), 0.0)
    scaled = weights * scale
    total = tl.sum(scaled, 0)
    mean = tl.sum(scaled * means, 0) / total
    m2 = tl.sum(m2s * scale, 0) + tl.sum(scaled * (means - mean) * (means - mean), 0)
    log_norm = top + tl.log(total)
    ratio_magnitude = tl.sum(tl.load(base + 4, mask=mask, other=0.0) * scale, 0) / total
    small = tl.max(tl.load(base + 8, mask=mask, other=0.0), 0) <= small_ratio
    if FLOAT32_WEIGHTS:
        cumulant = log_norm
        cumulant_noise = tl.where(small, float("inf"), slack * WEIGHT_ROUNDING)
        mean_noise = slack * WEIGHT_ROUNDING * tl.sqrt(m2 / total)
    else:
        tilt_magnitude = tl.sum(tl.load(base + 5, mask=mask, other=0.0) * scale, 0) / total
        mass = tl.sum(tl.load(base + 9, mask=mask, other=0.0), 0)
        series = _log1p(tl.sum(tl.load(base + 6, mask=mask, other=0.0), 0) / mass)
        series_noise = slack * (tl.abs(series)
                                + tl.sum(tl.load(base + 7, mask=mask, other=0.0), 0) / mass)
        direct = log_norm - tl.log(mass)
        direct_noise = slack * (1.0 + tl.abs(direct) + tl.abs(log_norm) + tl.log(mass)
                                + tilt_magnitude)
        cumulant = tl.where(small, series, direct)
        cumulant_noise = tl.where(small, series_noise, direct_noise)
        mean_noise = slack * ratio_magnitude * (1.0 + tl.abs(log_norm))
    return cumulant, cumulant_noise, mean, m2 / total, mean_noise


@triton.jit
def _shift_kernel(partials, chunks, slack, small_ratio, share, shift, shift_noise,
                  CHUNKS_P2: tl.constexpr):
    """r = K(1) − κ per row, from a pass at tilt 1 (`share` holds κ): f = h − r."""
    row = tl.program_id(0)
    cumulant, noise, _, _, _ = _merged_moments(partials, row, chunks, slack, small_ratio, False,
                                               CHUNKS_P2)
    kappa = tl.load(share + row)
    tl.store(shift + row, cumulant - kappa)
    tl.store(shift_noise + row, noise + slack * tl.abs(kappa))


@triton.jit
def _gap(partials, point, row, point_count, chunks, slack, small_ratio, shift, shift_noise,
         ESS: tl.constexpr, FLOAT32_WEIGHTS: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """(value, slope, value's rounding error, slope's rounding error) of the increasing
    equation at one point (`sampler.mixing._kl_symmetry_gap`, `_ess_gap`)."""
    r = tl.load(shift + row)
    r_noise = tl.load(shift_noise + row)
    k_low, k_low_noise, mean_low, variance, mean_noise = _merged_moments(
        partials, point, chunks, slack, small_ratio, FLOAT32_WEIGHTS, CHUNKS_P2)
    value = mean_low - r
    slope = variance
    noise = mean_noise + r_noise
    slope_noise = tl.zeros_like(noise)
    if ESS:
        k_high, k_high_noise, mean_high, _, mean_high_noise = _merged_moments(
            partials, point_count + point, chunks, slack, small_ratio, FLOAT32_WEIGHTS,
            CHUNKS_P2)
        value = k_low - k_high + 2.0 * r
        slope = mean_high - mean_low
        noise = k_low_noise + k_high_noise + 2.0 * r_noise
        slope_noise = mean_noise + mean_high_noise
    return value, slope, noise, slope_noise


@triton.jit
def _resolved(noise, slope, slope_noise, tolerance):
    """Whether a gap's rounding moves its root by at most `tolerance` (False for NaN)."""
    return noise <= tolerance * (slope - slope_noise)


@triton.jit
def _bracket_start_kernel(partials, rows, chunks, lower, upper, agreed, tolerance, slack,
                          small_ratio, shift, shift_noise, alpha, low, high, done, precise,
                          ESS: tl.constexpr, FLOAT32_WEIGHTS: tl.constexpr,
                          CHUNKS_P2: tl.constexpr):
    """From the gaps at both ends: clamp to an end, take the identical-models α (`agreed`)
    where neither end's sign is resolved, or start at the secant point. Rows already done
    are left alone. With FLOAT32_WEIGHTS, `precise` marks the rows whose start the float32
    rounding leaves unsettled: models that agree to it, an end taken on an unresolved
    sign, no finite gap."""
    row = tl.program_id(0)
    if tl.load(done + row) != 0:
        return
    gap_low, slope_low, noise_low, slope_noise_low = _gap(
        partials, row, row, 2 * rows, chunks, slack, small_ratio, shift, shift_noise, ESS,
        FLOAT32_WEIGHTS, CHUNKS_P2)
    gap_high, slope_high, noise_high, slope_noise_high = _gap(
        partials, rows + row, row, 2 * rows, chunks, slack, small_ratio, shift, shift_noise,
        ESS, FLOAT32_WEIGHTS, CHUNKS_P2)
    unsolvable = (gap_low != gap_low) | (gap_high != gap_high) | (tl.abs(gap_low) == float("inf")) \
        | (tl.abs(gap_high) == float("inf"))
    agree = (tl.abs(gap_low) <= noise_low) & (tl.abs(gap_high) <= noise_high)
    at_low = (gap_low >= -noise_low) & ~agree
    at_high = (gap_high <= noise_high) & (gap_low < -noise_low) & ~agree
    span = tl.maximum(gap_high - gap_low, 2.2250738585072014e-308)
    start = tl.minimum(tl.maximum(lower - gap_low * (upper - lower) / span, lower), upper)
    start = tl.where(at_low, lower, tl.where(at_high, upper, tl.where(agree, agreed, start)))
    tl.store(alpha + row, tl.where(unsolvable, float("nan"), start).to(tl.float32))
    tl.store(low + row, lower)
    tl.store(high + row, upper)
    tl.store(done + row, (at_low | at_high | agree | unsolvable).to(tl.int32))
    if FLOAT32_WEIGHTS:
        unsettled_low = at_low & (gap_low <= noise_low) & ~_resolved(
            noise_low, slope_low, slope_noise_low, tolerance)
        unsettled_high = at_high & (gap_high >= -noise_high) & ~_resolved(
            noise_high, slope_high, slope_noise_high, tolerance)
        tl.store(precise + row, tl.where(unsolvable | agree | unsettled_low | unsettled_high,
                                         REDO_FROM_ENDS, 0))


@triton.jit
def _newton_update_kernel(partials, rows, chunks, tolerance, slack, small_ratio, shift,
                          shift_noise, alpha, low, high, done, precise, ESS: tl.constexpr,
                          FLOAT32_WEIGHTS: tl.constexpr, BISECT: tl.constexpr,
                          CHUNKS_P2: tl.constexpr):
    """One safeguarded Newton (or, with BISECT, bisection) step for each unfinished row.
    With FLOAT32_WEIGHTS a row that stops on a gap within its float32 rounding, where that
    rounding could move α by more than `tolerance`, is marked in `precise` to be resumed in
    float64 from its bracket (which only resolved signs narrowed)."""
    row = tl.program_id(0)
    if tl.load(done + row) != 0:
        return
    value, slope, noise, slope_noise = _gap(partials, row, row, rows, chunks, slack,
                                            small_ratio, shift, shift_noise, ESS,
                                            FLOAT32_WEIGHTS, CHUNKS_P2)
    current = tl.load(alpha + row).to(tl.float64)
    in_noise = tl.abs(value) <= noise
    high_now = tl.where((value > 0) & ~in_noise, current, tl.load(high + row).to(tl.float64))
    low_now = tl.where((value > 0) | in_noise, tl.load(low + row).to(tl.float64), current)
    newton = current - value / tl.maximum(slope, 1e-300)
    proposal = 0.5 * (low_now + high_now)
    if not BISECT:
        proposal = tl.where((newton > low_now) & (newton < high_now), newton, proposal)
    unsolvable = value != value
    converged = (tl.abs(proposal - current) <= tolerance) | (high_now - low_now <= tolerance) \
        | in_noise | unsolvable
    tl.store(alpha + row, tl.where(unsolvable, float("nan"),
                                   tl.where(in_noise, current, proposal)).to(tl.float32))
    tl.store(low + row, low_now.to(tl.float32))
    tl.store(high + row, high_now.to(tl.float32))
    tl.store(done + row, converged.to(tl.int32))
    if FLOAT32_WEIGHTS:
        unsettled = in_noise & ~_resolved(noise, slope, slope_noise, tolerance)
        tl.store(precise + row, tl.where(unsolvable, REDO_FROM_ENDS,
                                         tl.where(unsettled, REDO_FROM_BRACKET, 0)))


@triton.jit
def _exponential_noise(key, offsets):
    """E ~ Exp(1) per offset, as −log(1 − u) with u from 62 random bits: resolved to 2⁻⁶²
    near 0 (where E decides which unlikely token wins), u capped below 1 (E ≤ 16.6)."""
    high, low, _, _ = tl.rand4x(key, offsets)
    u = tl.minimum(high + (low + TWO_TO_MINUS_32) * TWO_TO_MINUS_31, BELOW_ONE)
    series = u * (1.0 + u * (0.5 + u * (1.0 / 3.0)))
    return tl.where(u < SERIES_BELOW, series, -tl.log(1.0 - u))


@triton.jit
def _draw_partials_kernel(teacher, theta, stride_t, stride_s, vocab, inv_temperature, norm_t,
                          norm_s, alpha, draw_keys, scores, tokens, sums,
                          CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The noise of (row, token) is Philox keyed by the row's int64 key (`tl.rand4x` splits
    its 64 bits into Philox's two 32-bit keys) at counter = the token id; the keys are read
    from the device, so a CUDA graph of the step can be replayed with each step's keys."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    key = tl.load(draw_keys + row)
    norm_teacher = tl.load(norm_t + row)
    norm_theta = tl.load(norm_s + row)
    a = tl.load(alpha + row)
    best_score = tl.full([], float("-inf"), tl.float32)
    best_token = tl.zeros([], tl.int32)
    running_max = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(chunk * CHUNK_SIZE, tl.minimum((chunk + 1) * CHUNK_SIZE, vocab),
                       BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        lt, ls, inside = _tempered_log_probs(teacher, theta, stride_t, stride_s, row, cols,
                                             cols < vocab, inv_temperature, norm_teacher,
                                             norm_theta)
        x = tl.where(inside, (1.0 - a) * ls + a * lt, float("-inf"))
        score = x - tl.log(_exponential_noise(key, cols))
        block_best = tl.max(score, 0)
        block_token = tl.argmax(score, 0).to(tl.int32) + start
        better = block_best > best_score
        best_token = tl.where(better, block_token, best_token)
        best_score = tl.where(better, block_best, best_score)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        shift = _guarded(new_max)
        total = total * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
        running_max = new_max
    entry = row * chunks + chunk
    tl.store(scores + entry, best_score)
    tl.store(tokens + entry, best_token)
    tl.store(sums + entry * 2, running_max)
    tl.store(sums + entry * 2 + 1, total)


@triton.jit
def _draw_merge_kernel(teacher, theta, stride_t, stride_s, inv_temperature, norm_t, norm_s,
                       alpha, chunks, scores, tokens, sums, out_token, out_log_q, out_log_t,
                       out_log_s, CHUNKS_P2: tl.constexpr):
    """The winning token over a row's chunks and its recorded log-probabilities."""
    row = tl.program_id(0)
    offsets = tl.arange(0, CHUNKS_P2)
    mask = offsets < chunks
    entries = row * chunks + offsets
    chunk_scores = tl.load(scores + entries, mask=mask, other=float("-inf"))
    chunk_tokens = tl.load(tokens + entries, mask=mask, other=0)
    winner = tl.argmax(chunk_scores, 0)
    token = tl.sum(tl.where(offsets == winner, chunk_tokens, 0), 0)
    log_norm_q = _merge_logsumexp(tl.load(sums + entries * 2, mask=mask, other=float("-inf")),
                                  tl.load(sums + entries * 2 + 1, mask=mask, other=0.0))
    a = tl.load(alpha + row)
    log_t = tl.load(teacher + row * stride_t + token).to(tl.float32) * inv_temperature \
        - tl.load(norm_t + row)
    log_s = tl.load(theta + row * stride_s + token).to(tl.float32) * inv_temperature \
        - tl.load(norm_s + row)
    tl.store(out_token + row, token)
    tl.store(out_log_q + row, (1.0 - a) * log_s + a * log_t - log_norm_q)
    tl.store(out_log_t + row, log_t)
    tl.store(out_log_s + row, log_s)


def _chunks(vocab_size: int) -> tuple[int, int]:
    """Chunks per row, and that count rounded up to a power of two (for the merge kernels)."""
    chunks = triton.cdiv(vocab_size, CHUNK)
    return chunks, max(2, triton.next_power_of_2(chunks))


def log_normalisers(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: logsumexp of logits/T over the shared vocabulary, for both models."""
    rows, device = teacher.shape[0], teacher.device
    chunks, chunks_p2 = _chunks(vocab_size)
    partials = torch.empty(rows, chunks, 4, device=device, dtype=torch.float32)
    _normaliser_partials_kernel[(rows, chunks)](
        teacher, theta, teacher.stride(0), theta.stride(0), vocab_size, 1.0 / temperature,
        partials, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
    out_t = torch.empty(rows, device=device, dtype=torch.float32)
    out_s = torch.empty_like(out_t)
    _normaliser_merge_kernel[(rows,)](partials, chunks, out_t, out_s, CHUNKS_P2=chunks_p2)
    return out_t, out_s


def bisection_steps(lower: float, upper: float, tolerance: float) -> int:
    """Halvings that take any bracket inside [lower, upper] below the tolerance."""
    return max(0, math.ceil(math.log2((upper - lower) / tolerance)))


def solve_alpha(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int, temperature: float,
                method: str, lower: float, upper: float, tolerance: float, slack: float,
                small_ratio: float, agreed: float) -> torch.Tensor:
    """α per row (`solve_alpha_in_tiers`)."""
    return solve_alpha_in_tiers(teacher, theta, vocab_size, temperature, method, lower, upper,
                                tolerance, slack, small_ratio, agreed)[0]


def solve_alpha_in_tiers(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int,
                         temperature: float, method: str, lower: float, upper: float,
                         tolerance: float, slack: float, small_ratio: float, agreed: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """α per row, and per row the float32 schedule's mark: 0 where it settled the row, else
    `REDO_FROM_ENDS` or `REDO_FROM_BRACKET` (the float64 schedule took it over).

    α per row for `kl_symmetry` or `ess_balance`, clamped to [lower, upper]; `agreed`
    (the identical-models α) where the gap's sign is not resolved at either end.

    A row stops when its step is below `tolerance`, its bracket is narrower than that, or its
    gap is below `slack` times the magnitude of the terms it is computed from (rounding
    noise). The schedule runs with float32 weights, then again with float64 ones for the
    rows it left unsettled (module docstring); every launch has a fixed grid.
    """
    rows, device = teacher.shape[0], teacher.device
    if lower == upper:
        return (torch.full((rows,), lower, device=device),
                torch.zeros(rows, device=device, dtype=torch.int32))
    ess = method == "ess_balance"
    chunks, chunks_p2 = _chunks(vocab_size)
    centre_partials = torch.empty(rows, chunks, CENTRE_FIELDS.value, device=device,
                                  dtype=torch.float64)
    _centre_partials_kernel[(rows, chunks)](
        teacher, theta, teacher.stride(0), theta.stride(0), vocab_size, 1.0 / temperature,
        centre_partials, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
    mode = torch.empty(rows, device=device, dtype=torch.float64)
    centre, share, shift, shift_noise = (torch.empty_like(mode) for _ in range(4))
    _centre_merge_kernel[(rows,)](centre_partials, chunks, mode, centre, share,
                                  CHUNKS_P2=chunks_p2)
    alpha = torch.empty(rows, device=device, dtype=torch.float32)
    low, high = torch.empty_like(alpha), torch.empty_like(alpha)
    done = torch.zeros(rows, device=device, dtype=torch.int32)
    precise = torch.zeros_like(done)
    partials = torch.empty(2 * (2 if ess else 1) * rows, chunks, MOMENT_FIELDS.value,
                           device=device, dtype=torch.float64)
    common = (teacher, theta, teacher.stride(0), theta.stride(0), vocab_size, rows,
              1.0 / temperature, mode, centre)
    _moment_partials_kernel[(rows, chunks)](
        *common, torch.ones_like(alpha), rows, done, partials, ESS=False, FLOAT32_WEIGHTS=False,
        CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
    _shift_kernel[(rows,)](partials, chunks, slack, small_ratio, share, shift, shift_noise,
                           CHUNKS_P2=chunks_p2)
    schedule = _Schedule(common, partials, ess, lower, upper, agreed, tolerance, small_ratio,
                         shift, shift_noise, alpha, low, high, done, precise)
    schedule.start(FLOAT32_SLACK, float32_weights=True)
    schedule.iterate(FLOAT32_SLACK, float32_weights=True)
    done.copy_(precise != REDO_FROM_ENDS.value)
    schedule.start(slack, float32_weights=False)
    done.masked_fill_(precise == REDO_FROM_BRACKET.value, 0)
    schedule.iterate(slack, float32_weights=False)
    return alpha, precise


@dataclass
class _Schedule:
    """The solver's fixed launch schedule over the rows whose `done` is 0: both ends, then
    `NEWTON_STEPS` Newton passes and enough bisection passes for any bracket."""

    common: tuple
    partials: torch.Tensor
    ess: bool
    lower: float
    upper: float
    agreed: float
    tolerance: float
    small_ratio: float
    shift: torch.Tensor
    shift_noise: torch.Tensor
    alpha: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    done: torch.Tensor
    precise: torch.Tensor

    def start(self, slack: float, float32_weights: bool) -> None:
        """Both ends' gaps, then each row's clamp or starting point."""
        rows, chunks, chunks_p2, tilts = self._sizes()
        ends = torch.full((2 * rows,), self.lower, device=self.alpha.device,
                          dtype=torch.float32)
        ends[rows:] = self.upper
        _moment_partials_kernel[(2 * tilts * rows, chunks)](
            *self.common, ends, 2 * rows, self.done, self.partials, ESS=self.ess,
            FLOAT32_WEIGHTS=float32_weights, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
        _bracket_start_kernel[(rows,)](self.partials, rows, chunks, self.lower, self.upper,
                                       self.agreed, *self._solver(slack), ESS=self.ess,
                                       FLOAT32_WEIGHTS=float32_weights, CHUNKS_P2=chunks_p2)

    def iterate(self, slack: float, float32_weights: bool) -> None:
        """The Newton passes, then the bisection passes."""
        rows, chunks, chunks_p2, tilts = self._sizes()
        for step in range(NEWTON_STEPS + bisection_steps(self.lower, self.upper,
                                                         self.tolerance)):
            _moment_partials_kernel[(tilts * rows, chunks)](
                *self.common, self.alpha, rows, self.done, self.partials, ESS=self.ess,
                FLOAT32_WEIGHTS=float32_weights, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
            _newton_update_kernel[(rows,)](self.partials, rows, chunks, *self._solver(slack),
                                           ESS=self.ess, FLOAT32_WEIGHTS=float32_weights,
                                           BISECT=step >= NEWTON_STEPS, CHUNKS_P2=chunks_p2)

    def _sizes(self) -> tuple[int, int, int, int]:
        chunks = self.partials.shape[1]
        return (self.alpha.shape[0], chunks, max(2, triton.next_power_of_2(chunks)),
                2 if self.ess else 1)

    def _solver(self, slack: float) -> tuple:
        return (self.tolerance, slack, self.small_ratio, self.shift, self.shift_noise,
                self.alpha, self.low, self.high, self.done, self.precise)


def draw(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int, temperature: float,
         norms: tuple[torch.Tensor, torch.Tensor], alpha: torch.Tensor,
         draw_keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One token per row from q_α (Gumbel-max): (token ids, log q(y), log t(y), log θ(y)).

    `draw_keys`: [rows] int64 on the device, row i's noise keyed by draw_keys[i] alone.
    """
    rows, device = teacher.shape[0], teacher.device
    chunks, chunks_p2 = _chunks(vocab_size)
    scores = torch.empty(rows, chunks, device=device, dtype=torch.float32)
    chunk_tokens = torch.empty(rows, chunks, device=device, dtype=torch.int32)
    sums = torch.empty(rows, chunks, 2, device=device, dtype=torch.float32)
    alpha = alpha.float().contiguous()
    _draw_partials_kernel[(rows, chunks)](
        teacher, theta, teacher.stride(0), theta.stride(0), vocab_size, 1.0 / temperature,
        norms[0], norms[1], alpha, draw_keys.to(torch.int64).contiguous(), scores,
        chunk_tokens, sums, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
    tokens = torch.empty(rows, device=device, dtype=torch.int32)
    log_q, log_t, log_s = (torch.empty(rows, device=device, dtype=torch.float32)
                           for _ in range(3))
    _draw_merge_kernel[(rows,)](teacher, theta, teacher.stride(0), theta.stride(0),
                                1.0 / temperature, norms[0], norms[1], alpha, chunks, scores,
                                chunk_tokens, sums, tokens, log_q, log_t, log_s,
                                CHUNKS_P2=chunks_p2)
    return tokens.long(), log_q, log_t, log_s
