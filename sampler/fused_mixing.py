"""Fused Triton kernels for the mixing step on CUDA: no [rows, vocab] intermediates, no host sync.

Same math as `sampler.mixing`. Each row's vocabulary is split into chunks of `CHUNK` columns,
one program per (row, chunk), so a batch of a few hundred rows still fills the card; a second,
small kernel per pass merges a row's chunk partials (two-stage reduction).

- `log_normalisers`: logsumexp of both models' tempered logits;
- `solve_alpha`: the α of `kl_symmetry` or `ess_balance`, by the safeguarded Newton rule of
  `sampler.mixing._solve_increasing_root` run entirely on the device, on the same float64
  form of the equations (`sampler.mixing.LogRatio`: f = h − r, h the centred difference of
  the logits). A centre pass finds θ's mode, m and each model's mass on the support, a
  pass at tilt 1 gives r; then each pass reads both models' logits once and returns, for
  p_s ∝ θ·e^{s·h} (so p_α = q_α), K(s), E[h], Var[h] (merged Welford-style) and the
  magnitudes that bound rounding, accumulated in float64 per token (the float32 weights'
  ε₃₂ would move α by ε₃₂/√Var); the logits are read as before (bf16/float32) and the
  [rows, chunks, 10] partials are float64;
  the merge kernel applies the Newton/bisection update in place. A fixed launch schedule
  (`NEWTON_STEPS` Newton passes, then bisection passes enough to shrink any bracket below the
  tolerance) replaces the host's convergence checks; finished rows skip their passes;
- `draw`: y = argmax(log q − log E), E ~ Exp(1) per token (the exponential race, i.e.
  Gumbel-max) from counter-based random numbers (seed, row rank, token), so a row's draw does
  not depend on the engine's row order or on the chunking, and the recorded log q(y),
  log t(y), log θ(y). `sampler.mixing` states the exactness of this draw.

Every sum runs over the tokens both models allow (a −inf logit in either model gives q = 0),
and every running maximum is guarded, so a block far below the row's maximum (low
temperature) or wholly outside the support adds zero weight instead of 0/0. A row that has no
common support or a NaN logit ends with α or log q(y) NaN, which the lockstep reports.

Cost (one H200, 256 rows × 152,064 columns of bf16 logits, eager, same call): a step's
mixing took 4.17 ms for `kl_symmetry` and 6.25 ms for `ess_balance` with these float64
passes, against 1.44–1.97 and 2.08–2.27 ms with the float32 passes they replaced; the 7B +
0.5B pair with theta in its own process ran 12,580 tok/s (plain vLLM 18,785 in a call just
before; 14,764 against 18,795 at the float32 kernels). Per-token float32 with only the
accumulators in float64, or float64 only for rows whose float32 gap is within its rounding,
is where that time is to be won back.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: Columns each program reduces, and columns per loop iteration inside a program.
CHUNK = 8192
BLOCK = 1024
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
def _log1p(v):
    """log(1 + v) to float64 precision relative to v (the correction of log(u)/(u − 1))."""
    u = 1.0 + v
    return tl.where(u == 1.0, v, tl.log(u) * v / (u - 1.0))


@triton.jit
def _moment_partials_kernel(teacher, theta, stride_t, stride_s, vocab, rows, inv_temperature,
                            mode, centre, points, point_count, done, partials,
                            ESS: tl.constexpr, SKIP_DONE: tl.constexpr,
                            CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Entry e = j·point_count + point: tilt s = α_point (kl) or 2j − α_point (ess, j ∈ {0,1}),
    of p_s ∝ θ·e^{s·h}, h = g − m (`sampler.mixing.LogRatio`), in float64."""
    entry = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    point = entry % point_count
    row = point % rows
    if SKIP_DONE:
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
        w = tl.exp(x - shift)
        block_weight = tl.sum(w, 0)
        block_mean = tl.sum(w * h, 0) / tl.maximum(block_weight, 1e-300)
        block_m2 = tl.sum(w * (h - block_mean) * (h - block_mean), 0)
        absolute_x = tl.where(inside, tl.abs(x), 0.0)
        weight = weight * scale
        m2 = m2 * scale
        ratio_magnitude = ratio_magnitude * scale + tl.sum(w * tl.abs(h) * (1.0 + absolute_x), 0)
        tilt_magnitude = tilt_magnitude * scale + tl.sum(w * absolute_x, 0)
        total = weight + block_weight
        share = block_weight / tl.maximum(total, 1e-300)
        delta = block_mean - mean
        mean = mean + delta * share
        m2 = m2 + block_m2 + delta * delta * weight * share
        weight = total
        running_max = new_max
        base_weight = tl.exp(log_base)
        exponent = s * h
        series += tl.sum(tl.where(inside, base_weight * _expm1(exponent), 0.0), 0)
        series_magnitude += tl.sum(tl.where(inside, base_weight * tl.abs(exponent) * (
            1.0 + tl.abs(log_base)), 0.0), 0)
        largest_ratio = tl.maximum(largest_ratio, tl.max(tl.abs(h), 0))
        mass += tl.sum(base_weight, 0)
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
def _merged_moments(partials, entry, chunks, slack, small_ratio, CHUNKS_P2: tl.constexpr):
    """(K(s), its rounding bound, E[h], Var[h], E[h]'s rounding bound) of one entry from its
    chunk partials: K(s) by log1p of the expm1 sum while |h| ≤ small_ratio, else by
    logsumexp (`sampler.mixing.LogRatio.tilt`)."""
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
    tilt_magnitude = tl.sum(tl.load(base + 5, mask=mask, other=0.0) * scale, 0) / total
    mass = tl.sum(tl.load(base + 9, mask=mask, other=0.0), 0)
    series = _log1p(tl.sum(tl.load(base + 6, mask=mask, other=0.0), 0) / mass)
    series_noise = slack * (tl.abs(series)
                            + tl.sum(tl.load(base + 7, mask=mask, other=0.0), 0) / mass)
    direct = log_norm - tl.log(mass)
    direct_noise = slack * (1.0 + tl.abs(direct) + tl.abs(log_norm) + tl.log(mass)
                            + tilt_magnitude)
    small = tl.max(tl.load(base + 8, mask=mask, other=0.0), 0) <= small_ratio
    return (tl.where(small, series, direct), tl.where(small, series_noise, direct_noise), mean,
            m2 / total, slack * ratio_magnitude * (1.0 + tl.abs(log_norm)))


@triton.jit
def _shift_kernel(partials, chunks, slack, small_ratio, share, shift, shift_noise,
                  CHUNKS_P2: tl.constexpr):
    """r = K(1) − κ per row, from a pass at tilt 1 (`share` holds κ): f = h − r."""
    row = tl.program_id(0)
    cumulant, noise, _, _, _ = _merged_moments(partials, row, chunks, slack, small_ratio,
                                               CHUNKS_P2)
    kappa = tl.load(share + row)
    tl.store(shift + row, cumulant - kappa)
    tl.store(shift_noise + row, noise + slack * tl.abs(kappa))


@triton.jit
def _gap(partials, point, row, point_count, chunks, slack, small_ratio, shift, shift_noise,
         ESS: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """(value, slope, rounding error) of the increasing equation at one point
    (`sampler.mixing._kl_symmetry_gap`, `_ess_gap`)."""
    r = tl.load(shift + row)
    r_noise = tl.load(shift_noise + row)
    k_low, k_low_noise, mean_low, variance, mean_noise = _merged_moments(
        partials, point, chunks, slack, small_ratio, CHUNKS_P2)
    value = mean_low - r
    slope = variance
    noise = mean_noise + r_noise
    if ESS:
        k_high, k_high_noise, mean_high, _, _ = _merged_moments(
            partials, point_count + point, chunks, slack, small_ratio, CHUNKS_P2)
        value = k_low - k_high + 2.0 * r
        slope = mean_high - mean_low
        noise = k_low_noise + k_high_noise + 2.0 * r_noise
    return value, slope, noise


@triton.jit
def _bracket_start_kernel(partials, rows, chunks, lower, upper, agreed, slack, small_ratio,
                          shift, shift_noise, alpha, low, high, done, ESS: tl.constexpr,
                          CHUNKS_P2: tl.constexpr):
    """From the gaps at both ends: clamp to an end, take the identical-models α (`agreed`)
    where neither end's sign is resolved, or start at the secant point."""
    row = tl.program_id(0)
    gap_low, _, noise_low = _gap(partials, row, row, 2 * rows, chunks, slack, small_ratio,
                                 shift, shift_noise, ESS, CHUNKS_P2)
    gap_high, _, noise_high = _gap(partials, rows + row, row, 2 * rows, chunks, slack,
                                   small_ratio, shift, shift_noise, ESS, CHUNKS_P2)
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


@triton.jit
def _newton_update_kernel(partials, rows, chunks, tolerance, slack, small_ratio, shift,
                          shift_noise, alpha, low, high, done, ESS: tl.constexpr,
                          BISECT: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """One safeguarded Newton (or, with BISECT, bisection) step for each unfinished row."""
    row = tl.program_id(0)
    if tl.load(done + row) != 0:
        return
    value, slope, noise = _gap(partials, row, row, rows, chunks, slack, small_ratio, shift,
                               shift_noise, ESS, CHUNKS_P2)
    current = tl.load(alpha + row).to(tl.float64)
    high_now = tl.where(value > 0, current, tl.load(high + row).to(tl.float64))
    low_now = tl.where(value > 0, tl.load(low + row).to(tl.float64), current)
    newton = current - value / tl.maximum(slope, 1e-300)
    proposal = 0.5 * (low_now + high_now)
    if not BISECT:
        proposal = tl.where((newton > low_now) & (newton < high_now), newton, proposal)
    in_noise = tl.abs(value) <= noise
    unsolvable = value != value
    converged = (tl.abs(proposal - current) <= tolerance) | (high_now - low_now <= tolerance) \
        | in_noise | unsolvable
    tl.store(alpha + row, tl.where(unsolvable, float("nan"),
                                   tl.where(in_noise, current, proposal)).to(tl.float32))
    tl.store(low + row, low_now.to(tl.float32))
    tl.store(high + row, high_now.to(tl.float32))
    tl.store(done + row, converged.to(tl.int32))


@triton.jit
def _exponential_noise(seed, offsets):
    """E ~ Exp(1) per offset, as −log(1 − u) with u from 62 random bits: resolved to 2⁻⁶²
    near 0 (where E decides which unlikely token wins), u capped below 1 (E ≤ 16.6)."""
    high, low, _, _ = tl.rand4x(seed, offsets)
    u = tl.minimum(high + (low + TWO_TO_MINUS_32) * TWO_TO_MINUS_31, BELOW_ONE)
    series = u * (1.0 + u * (0.5 + u * (1.0 / 3.0)))
    return tl.where(u < SERIES_BELOW, series, -tl.log(1.0 - u))


@triton.jit
def _draw_partials_kernel(teacher, theta, stride_t, stride_s, vocab, inv_temperature, norm_t,
                          norm_s, alpha, ranks, seed_ptr, scores, tokens, sums,
                          CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The seed is read from the device (`seed_ptr`: [1] int64), so a CUDA graph of the step
    can be replayed with each step's seed."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    seed = tl.load(seed_ptr)
    norm_teacher = tl.load(norm_t + row)
    norm_theta = tl.load(norm_s + row)
    a = tl.load(alpha + row)
    rank = tl.load(ranks + row)
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
        score = x - tl.log(_exponential_noise(seed, rank * vocab + cols))
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
    """α per row for `kl_symmetry` or `ess_balance`, clamped to [lower, upper]; `agreed`
    (the identical-models α) where the gap's sign is not resolved at either end.

    A row stops when its step is below `tolerance`, its bracket is narrower than that, or its
    gap is below `slack` times the magnitude of the terms it is computed from (rounding
    noise). Float64 per token, as `sampler.mixing.LogRatio` says why.
    """
    rows, device = teacher.shape[0], teacher.device
    if lower == upper:
        return torch.full((rows,), lower, device=device)
    ess = method == "ess_balance"
    tilts = 2 if ess else 1
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
    partials = torch.empty(2 * tilts * rows, chunks, MOMENT_FIELDS.value, device=device,
                           dtype=torch.float64)
    common = (teacher, theta, teacher.stride(0), theta.stride(0), vocab_size, rows,
              1.0 / temperature, mode, centre)
    constants = dict(CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
    _moment_partials_kernel[(rows, chunks)](
        *common, torch.ones_like(alpha), rows, done, partials, ESS=False, SKIP_DONE=False,
        **constants)
    _shift_kernel[(rows,)](partials, chunks, slack, small_ratio, share, shift, shift_noise,
                           CHUNKS_P2=chunks_p2)
    ends = torch.full((2 * rows,), lower, device=device, dtype=torch.float32)
    ends[rows:] = upper
    _moment_partials_kernel[(2 * tilts * rows, chunks)](
        *common, ends, 2 * rows, done, partials, ESS=ess, SKIP_DONE=False, **constants)
    solver = (slack, small_ratio, shift, shift_noise, alpha, low, high, done)
    _bracket_start_kernel[(rows,)](partials, rows, chunks, lower, upper, agreed, *solver,
                                   ESS=ess, CHUNKS_P2=chunks_p2)
    for step in range(NEWTON_STEPS + bisection_steps(lower, upper, tolerance)):
        _moment_partials_kernel[(tilts * rows, chunks)](
            *common, alpha, rows, done, partials, ESS=ess, SKIP_DONE=True, **constants)
        _newton_update_kernel[(rows,)](partials, rows, chunks, tolerance, *solver, ESS=ess,
                                       BISECT=step >= NEWTON_STEPS, CHUNKS_P2=chunks_p2)
    return alpha


def draw(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int, temperature: float,
         norms: tuple[torch.Tensor, torch.Tensor], alpha: torch.Tensor, ranks: torch.Tensor,
         seed: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One token per row from q_α (Gumbel-max): (token ids, log q(y), log t(y), log θ(y)).

    `seed`: an int, or a [1] int64 device tensor holding it (what a captured graph reads).
    """
    rows, device = teacher.shape[0], teacher.device
    if not isinstance(seed, torch.Tensor):
        seed = torch.full((1,), seed, device=device, dtype=torch.int64)
    chunks, chunks_p2 = _chunks(vocab_size)
    scores = torch.empty(rows, chunks, device=device, dtype=torch.float32)
    chunk_tokens = torch.empty(rows, chunks, device=device, dtype=torch.int32)
    sums = torch.empty(rows, chunks, 2, device=device, dtype=torch.float32)
    alpha = alpha.float().contiguous()
    _draw_partials_kernel[(rows, chunks)](
        teacher, theta, teacher.stride(0), theta.stride(0), vocab_size, 1.0 / temperature,
        norms[0], norms[1], alpha, ranks.to(torch.int32).contiguous(), seed, scores,
        chunk_tokens, sums, CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK)
    tokens = torch.empty(rows, device=device, dtype=torch.int32)
    log_q, log_t, log_s = (torch.empty(rows, device=device, dtype=torch.float32)
                           for _ in range(3))
    _draw_merge_kernel[(rows,)](teacher, theta, teacher.stride(0), theta.stride(0),
                                1.0 / temperature, norms[0], norms[1], alpha, chunks, scores,
                                chunk_tokens, sums, tokens, log_q, log_t, log_s,
                                CHUNKS_P2=chunks_p2)
    return tokens.long(), log_q, log_t, log_s
