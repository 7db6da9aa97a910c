"""Float64 oracle for the mixing sampler: the same sampling, written plainly.

Used by the tests to check the engine-based sampler. Independent of `sampler.mixing`:
numpy in float64, α found by Brent's method on the defining equations, and the models run
by plain transformers in float64 over each full sequence (teacher on its own prefix, theta
on its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp


def log_softmax(values: np.ndarray) -> np.ndarray:
    return values - logsumexp(values)


def _kl_symmetry_gap(log_teacher: np.ndarray, log_theta: np.ndarray, alpha: float) -> float:
    log_q = log_softmax((1 - alpha) * log_theta + alpha * log_teacher)
    q = np.exp(log_q)
    kl_q_theta = float(np.sum(q * (log_q - log_theta)))
    kl_q_teacher = float(np.sum(q * (log_q - log_teacher)))
    return kl_q_theta - kl_q_teacher


def _ess_gap(log_teacher: np.ndarray, log_theta: np.ndarray, alpha: float) -> float:
    log_q = log_softmax((1 - alpha) * log_theta + alpha * log_teacher)
    return float(logsumexp(2 * log_theta - log_q) - logsumexp(2 * log_teacher - log_q))


def _entropy(log_probs: np.ndarray) -> float:
    finite = log_probs > -np.inf
    return -float(np.sum(np.exp(log_probs[finite]) * log_probs[finite]))


def reference_alpha(log_teacher: np.ndarray, log_theta: np.ndarray, method: str,
                    alpha_min: float, alpha_max: float, fixed_alpha: float = 0.5) -> float:
    """α for one row from its definition, clamped to [alpha_min, alpha_max].

    The equations are taken over the tokens both models allow (q is 0 elsewhere); a row
    with no such token has no α (NaN). Where the gap is zero over the whole range (identical
    models) α is the identical-models limit, 0.5 clamped. The equations use log t − log θ
    as given: its rounding, ε·|log p|, moves α by that over Var_q(log t − log θ), so pass
    long-double log-probs (ε = 1.1e-19) for rows where the models nearly agree.
    """
    if method == "fixed":
        return float(np.clip(fixed_alpha, alpha_min, alpha_max))
    if method == "entropy":
        entropy_theta, entropy_teacher = _entropy(log_theta), _entropy(log_teacher)
        total = entropy_theta + entropy_teacher
        alpha = entropy_theta / total if total > 0 else 0.5
        return float(np.clip(alpha, alpha_min, alpha_max))
    inside = (log_teacher > -np.inf) & (log_theta > -np.inf)
    if not inside.any():
        return float("nan")
    log_teacher, log_theta = log_teacher[inside], log_theta[inside]
    gap = {"kl_symmetry": _kl_symmetry_gap, "ess_balance": _ess_gap}[method]
    low, high = gap(log_teacher, log_theta, alpha_min), gap(log_teacher, log_theta, alpha_max)
    if low >= 0 and high <= 0:
        return float(np.clip(0.5, alpha_min, alpha_max))
    if low >= 0:
        return alpha_min
    if high <= 0:
        return alpha_max
    return float(brentq(lambda a: gap(log_teacher, log_theta, a), alpha_min, alpha_max,
                        xtol=1e-13, rtol=1e-13, maxiter=500))


def reference_mixture(log_teacher: np.ndarray, log_theta: np.ndarray, alpha: float,
                      top_k: int = -1, top_p: float = 1.0) -> np.ndarray:
    """Normalised log q over the tokens both models allow, restricted to the teacher's
    top-k set and then its top-p nucleus of that set (vLLM's order)."""
    keep = np.ones(len(log_teacher), dtype=bool)
    if top_k != -1:
        keep &= log_teacher >= np.sort(log_teacher)[::-1][min(top_k, len(log_teacher)) - 1]
    if top_p < 1.0:
        renormalised = log_softmax(np.where(keep, log_teacher, -np.inf))
        order = np.argsort(-renormalised, kind="stable")
        probs = np.exp(renormalised[order])
        mass_before = np.cumsum(probs) - probs
        nucleus = np.zeros_like(keep)
        nucleus[order[mass_before < top_p]] = True
        keep &= nucleus
    keep &= (log_teacher > -np.inf) & (log_theta > -np.inf)
    with np.errstate(invalid="ignore"):
        mixed = (1 - alpha) * log_theta + alpha * log_teacher
    return log_softmax(np.where(keep, mixed, -np.inf))


@dataclass
class ScoredSequence:
    """Per generated token: the reference's view of what the sampler should have recorded."""

    log_teacher: np.ndarray
    log_theta: np.ndarray
    alpha: np.ndarray
    log_q: np.ndarray


class ReferenceModels:
    """Teacher and theta run by transformers in float64 on the CPU."""

    def __init__(self, teacher_path: str | Path, theta_path: str | Path, vocab_size: int):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.vocab_size = vocab_size
        self.teacher = AutoModelForCausalLM.from_pretrained(
            str(teacher_path), dtype=torch.float64).eval()
        self.theta = AutoModelForCausalLM.from_pretrained(
            str(theta_path), dtype=torch.float64).eval()

    def _log_probs(self, model, prompt_ids: list[int], generated: list[int], temperature: float
                   ) -> np.ndarray:
        """Tempered log-probs of the next token at every generated position (plus one more)."""
        torch = self._torch
        ids = torch.tensor([list(prompt_ids) + list(generated)], dtype=torch.long)
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1:, : self.vocab_size]
        return torch.log_softmax(logits / temperature, dim=-1).numpy()

    def next_token_log_probs(self, teacher_prompt: list[int], theta_prompt: list[int],
                             temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Both models' tempered log-probs for the first generated token."""
        return (self._log_probs(self.teacher, teacher_prompt, [], temperature)[0],
                self._log_probs(self.theta, theta_prompt, [], temperature)[0])

    def score(self, teacher_prompt: list[int], theta_prompt: list[int], generated: list[int],
              method: str, alpha_min: float, alpha_max: float, fixed_alpha: float = 0.5,
              temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> ScoredSequence:
        """Recompute α, log q(y), log t(y), log θ(y) for each token of `generated`."""
        teacher = self._log_probs(self.teacher, teacher_prompt, generated, temperature)
        theta = self._log_probs(self.theta, theta_prompt, generated, temperature)
        rows = len(generated)
        result = ScoredSequence(*(np.empty(rows) for _ in range(4)))
        for position, token in enumerate(generated):
            alpha = reference_alpha(teacher[position], theta[position], method, alpha_min,
                                    alpha_max, fixed_alpha)
            log_q = reference_mixture(teacher[position], theta[position], alpha, top_k, top_p)
            result.log_teacher[position] = teacher[position][token]
            result.log_theta[position] = theta[position][token]
            result.alpha[position] = alpha
            result.log_q[position] = log_q[token]
        return result

    def generate(self, teacher_prompt: list[int], theta_prompt: list[int], max_tokens: int,
                 eos_token_id: int, method: str, alpha_min: float, alpha_max: float,
                 seed: int, fixed_alpha: float = 0.5, temperature: float = 1.0) -> list[int]:
        """Plain step-by-step sampling from q in float64 (a whole forward pass per token)."""
        rng = np.random.default_rng(seed)
        generated: list[int] = []
        while len(generated) < max_tokens:
            teacher = self._log_probs(self.teacher, teacher_prompt, generated, temperature)[-1]
            theta = self._log_probs(self.theta, theta_prompt, generated, temperature)[-1]
            alpha = reference_alpha(teacher, theta, method, alpha_min, alpha_max, fixed_alpha)
            q = np.exp(reference_mixture(teacher, theta, alpha))
            token = int(rng.choice(len(teacher), p=q))
            generated.append(token)
            if token == eos_token_id:
                break
        return generated
