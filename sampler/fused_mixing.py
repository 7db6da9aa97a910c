"""Fused Triton kernels for the mixing step on CUDA: one pass over the vocabulary per use.

Same math as `sampler.mixing`, without materialising [rows, vocab] intermediates:
- `tilted_moments` reads both models' raw logits once and returns, per row, for the tilted
  distribution p_s ∝ θ·e^{s·f} (f = log t − log θ, so p_α = q_α): log-normaliser, E[f],
  Var[f] (merged Welford-style across blocks) and the magnitude that bounds rounding;
- `gumbel_draw` draws y = argmax(log q + Gumbel noise) with counter-based random numbers
  (seed, row rank, token), so a row's draw does not depend on the engine's row order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _log_normalisers_kernel(teacher, theta, stride_t, stride_s, vocab, inv_temperature,
                            out_t, out_s, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    max_t = tl.full([], float("-inf"), tl.float32)
    max_s = tl.full([], float("-inf"), tl.float32)
    sum_t = tl.zeros([], tl.float32)
    sum_s = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab
        zt = tl.load(teacher + row * stride_t + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        zs = tl.load(theta + row * stride_s + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        new_t = tl.maximum(max_t, tl.max(zt, 0))
        new_s = tl.maximum(max_s, tl.max(zs, 0))
        sum_t = sum_t * tl.exp(max_t - new_t) + tl.sum(tl.exp(zt - new_t), 0)
        sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.exp(zs - new_s), 0)
        max_t, max_s = new_t, new_s
    tl.store(out_t + row, max_t + tl.log(sum_t))
    tl.store(out_s + row, max_s + tl.log(sum_s))


@triton.jit
def _tilted_moments_kernel(teacher, theta, stride_t, stride_s, vocab, rows, inv_temperature,
                           norm_t, norm_s, tilt, out_lse, out_mean, out_var, out_magnitude,
                           BLOCK_SIZE: tl.constexpr):
    program = tl.program_id(0)
    row = program % rows
    a_t = tl.load(norm_t + row)
    a_s = tl.load(norm_s + row)
    s = tl.load(tilt + program)
    running_max = tl.full([], float("-inf"), tl.float32)
    weight = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    magnitude = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab
        lt = tl.load(teacher + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - a_t
        ls = tl.load(theta + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - a_s
        f = lt - ls
        x = tl.where(mask, ls + s * f, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, 0))
        scale = tl.exp(running_max - new_max)
        w = tl.exp(x - new_max)
        block_weight = tl.sum(w, 0)
        block_mean = tl.sum(w * f, 0) / block_weight
        block_m2 = tl.sum(w * (f - block_mean) * (f - block_mean), 0)
        weight = weight * scale
        m2 = m2 * scale
        magnitude = magnitude * scale + tl.sum(
            w * tl.where(mask, tl.abs(lt) + tl.abs(ls) + tl.abs(x), 0.0), 0)
        total = weight + block_weight
        delta = block_mean - mean
        mean = mean + delta * block_weight / total
        m2 = m2 + block_m2 + delta * delta * weight * block_weight / total
        weight = total
        running_max = new_max
    tl.store(out_lse + program, running_max + tl.log(weight))
    tl.store(out_mean + program, mean)
    tl.store(out_var + program, m2 / weight)
    tl.store(out_magnitude + program, magnitude / weight)


@triton.jit
def _gumbel_draw_kernel(teacher, theta, stride_t, stride_s, vocab, inv_temperature, norm_t,
                        norm_s, alpha, ranks, seed, out_token, out_lse,
                        BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    a_t = tl.load(norm_t + row)
    a_s = tl.load(norm_s + row)
    a = tl.load(alpha + row)
    rank = tl.load(ranks + row)
    best_score = tl.full([], float("-inf"), tl.float32)
    best_token = tl.zeros([], tl.int32)
    running_max = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab
        lt = tl.load(teacher + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - a_t
        ls = tl.load(theta + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - a_s
        x = tl.where(mask, (1.0 - a) * ls + a * lt, float("-inf"))
        uniform = tl.rand(seed, rank * vocab + cols)
        uniform = tl.minimum(tl.maximum(uniform, 1e-12), 1.0 - 1e-7)
        score = x - tl.log(-tl.log(uniform))
        block_best = tl.max(score, 0)
        block_token = tl.argmax(score, 0).to(tl.int32) + start
        better = block_best > best_score
        best_token = tl.where(better, block_token, best_token)
        best_score = tl.where(better, block_best, best_score)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        total = total * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    tl.store(out_token + row, best_token)
    tl.store(out_lse + row, running_max + tl.log(total))


def log_normalisers(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: logsumexp of logits/T over the shared vocabulary, for both models."""
    rows = teacher.shape[0]
    out_t = torch.empty(rows, device=teacher.device, dtype=torch.float32)
    out_s = torch.empty_like(out_t)
    _log_normalisers_kernel[(rows,)](teacher, theta, teacher.stride(0), theta.stride(0),
                                     vocab_size, 1.0 / temperature, out_t, out_s,
                                     BLOCK_SIZE=BLOCK)
    return out_t, out_s


def tilted_moments(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int,
                   temperature: float, norms: tuple[torch.Tensor, torch.Tensor],
                   tilt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For p ∝ θ·e^{tilt·f}: (log normaliser, E[f], Var[f], E[|log t|+|log θ|+|x|]).

    `tilt` is [rows] or [k, rows] (k tilts per row in one launch); outputs have its shape.
    """
    rows = teacher.shape[0]
    tilt = tilt.float().contiguous()
    outputs = [torch.empty(tilt.shape, device=teacher.device, dtype=torch.float32)
               for _ in range(4)]
    _tilted_moments_kernel[(tilt.numel(),)](teacher, theta, teacher.stride(0), theta.stride(0),
                                            vocab_size, rows, 1.0 / temperature, norms[0],
                                            norms[1], tilt, *outputs, BLOCK_SIZE=BLOCK)
    return tuple(outputs)


def gumbel_draw(teacher: torch.Tensor, theta: torch.Tensor, vocab_size: int, temperature: float,
                norms: tuple[torch.Tensor, torch.Tensor], alpha: torch.Tensor,
                ranks: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from q_α (Gumbel-max), and log Σ exp of q's unnormalised logits."""
    rows = teacher.shape[0]
    tokens = torch.empty(rows, device=teacher.device, dtype=torch.int32)
    lse = torch.empty(rows, device=teacher.device, dtype=torch.float32)
    _gumbel_draw_kernel[(rows,)](teacher, theta, teacher.stride(0), theta.stride(0), vocab_size,
                                 1.0 / temperature, norms[0], norms[1],
                                 alpha.float().contiguous(), ranks.to(torch.int32).contiguous(),
                                 seed, tokens, lse, BLOCK_SIZE=BLOCK)
    return tokens.long(), lse
