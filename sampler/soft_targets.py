"""The teacher's and the student's soft targets: each model's k most likely tokens per step.

Offline knowledge distillation trains the student on the teacher's distribution; storing its
top-k log-probs once spares keeping the teacher loaded during training. The distribution is
each model's own log-softmax at temperature 1 over the shared vocabulary, before any
temperature, top-k or top-p of the mixing: what KD losses compare. It is computed on the
device from the logits the step already holds and travels to the host inside the step's
record, so it adds no synchronisation and no per-token Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sampler.errors import ConfigError

#: The most tokens per position `top_logprobs` records (20: what vLLM and OpenAI allow).
MAX_TOP_LOGPROBS = 20
#: The four per-token lists, in the order `top_logprobs` lays out its columns.
SOFT_TARGET_COLUMNS = ("teacher_top_ids", "teacher_top_logprobs",
                       "theta_top_ids", "theta_top_logprobs")


def top_logprobs(teacher_logits: torch.Tensor, theta_logits: torch.Tensor, vocab_size: int,
                 k: int) -> torch.Tensor:
    """[rows, 4k] float64: teacher ids, teacher log-probs, theta ids, theta log-probs, each k
    wide and most likely first. `theta_logits` rows are aligned to `teacher_logits` rows."""
    blocks = []
    for logits in (teacher_logits, theta_logits):
        log_probs = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
        values, ids = torch.topk(log_probs, k, dim=-1)
        blocks += [ids.double(), values.double()]
    return torch.cat(blocks, dim=1)


def split_soft_targets(columns: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The `top_logprobs` columns of a trace ([tokens, 4k]) as one [tokens, k] array per
    `SOFT_TARGET_COLUMNS` name (ids as int64)."""
    parts = {}
    for position, name in enumerate(SOFT_TARGET_COLUMNS):
        block = columns[:, position * k:(position + 1) * k]
        parts[name] = block.astype(np.int64) if name.endswith("_ids") else block
    return parts


def check_top_logprobs(k: Any, vocab_size: int | None = None) -> int:
    """`k` if it is a valid `top_logprobs`: 0 (off) or 1 to `MAX_TOP_LOGPROBS`, and at most
    the shared vocabulary where it is known."""
    if type(k) is not int or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top_logprobs: {k!r} is not a whole number from 0 (off) to "
                          f"{MAX_TOP_LOGPROBS}")
    if vocab_size is not None and k > vocab_size:
        raise ConfigError(f"top_logprobs: {k} is more than the {vocab_size} tokens both models "
                          "share")
    return k
