"""The public sampler: `OptimalSamplingV1`, its output, and `save_alpha_history`.

Keeps the seed implementation's names and arguments so its users can switch, and adds
per-row errors: a row that cannot be generated (empty or over-long prompt) is reported
with its reason while the other rows complete.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sampler.errors import ConfigError
from sampler.lockstep import LockstepPair, PairRequest, PairTrace
from sampler.mixing import MixingConfig
from sampler.prompts import (PromptFormat, check_same_tokenizer, load_tokenizer,
                             render_prompt_ids, stop_token_ids)

logger = logging.getLogger(__name__)

REJECTED = "rejected"


def summarize_alpha(alphas: np.ndarray) -> dict[str, float | int]:
    """Mean, std, min, max and count of a set of α values (zeros and count 0 when empty)."""
    if alphas.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "count": 0}
    return {"mean": float(alphas.mean()), "std": float(alphas.std()),
            "min": float(alphas.min()), "max": float(alphas.max()), "count": int(alphas.size)}


@dataclass
class OptimalSamplingOutput:
    """Everything `generate` produced, one list entry per input row."""

    generated_texts: list[str]
    generated_ids: list[list[int]]
    num_tokens: list[int]
    finish_reasons: list[str]
    errors: list[str | None]
    alpha_history: list[list[float]]
    mixed_logprobs: list[list[float]]
    teacher_logprobs: list[list[float]]
    theta_logprobs: list[list[float]]
    alpha_stats: dict[str, float | int] | None
    per_row_alpha_stats: list[dict[str, float | int]] = field(default_factory=list)
    seed: int = 0
    teacher_prompt_ids: list[list[int]] = field(default_factory=list)
    theta_prompt_ids: list[list[int]] = field(default_factory=list)


def save_alpha_history(output: OptimalSamplingOutput, path: str | Path) -> None:
    """Write the α history and statistics as JSON, atomically (temp file, then rename)."""
    path = Path(path)
    payload = {"alpha_stats": output.alpha_stats, "per_row_alpha_stats": output.per_row_alpha_stats,
               "alpha_history": output.alpha_history, "seed": output.seed}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload))
    os.replace(temporary, path)


def model_context_length(model: str) -> int:
    """The checkpoint's own context length: with unchunked prefills (which the lockstep
    needs) vLLM wants a token budget at least that large."""
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 0) or 0)


class OptimalSamplingV1:
    """Draws each token from q ∝ π_θ^(1-α)·π_t^α with two vLLM engines in lockstep."""

    def __init__(self, model_teacher: str, model_theta: str,
                 teacher_system_prompt: str | None = None,
                 theta_system_prompt: str | None = None,
                 enable_chat_template: bool = True, track_alpha_stats: bool = True,
                 alpha_method: str = "kl_symmetry", fixed_alpha: float = 0.5,
                 alpha_min: float = 0.5, alpha_max: float = 1.0,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 dtype: str = "auto", enforce_eager: bool = False,
                 teacher_gpu_memory_utilization: float = 0.55,
                 theta_gpu_memory_utilization: float = 0.3,
                 engine_kwargs: dict[str, Any] | None = None,
                 teacher_engine_kwargs: dict[str, Any] | None = None,
                 theta_engine_kwargs: dict[str, Any] | None = None):
        self.mixing_defaults = MixingConfig(alpha_method=alpha_method, fixed_alpha=fixed_alpha,
                                            alpha_min=alpha_min, alpha_max=alpha_max)
        self.track_alpha_stats = track_alpha_stats
        self.teacher_format = PromptFormat(teacher_system_prompt, enable_chat_template)
        self.theta_format = PromptFormat(theta_system_prompt, enable_chat_template)
        self.model_teacher, self.model_theta = str(model_teacher), str(model_theta)
        self.tokenizer = load_tokenizer(self.model_teacher, "teacher")
        check_same_tokenizer(self.tokenizer, load_tokenizer(self.model_theta, "theta"))
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model_teacher, self.model_theta)

        shared = {"dtype": dtype, "max_num_seqs": max_num_seqs, "enforce_eager": enforce_eager,
                  **({"max_model_len": max_model_len} if max_model_len else {}),
                  **(engine_kwargs or {})}
        teacher_args = {"gpu_memory_utilization": teacher_gpu_memory_utilization, **shared,
                        **(teacher_engine_kwargs or {})}
        theta_args = {"gpu_memory_utilization": theta_gpu_memory_utilization, **shared,
                      **(theta_engine_kwargs or {})}
        for model, args in ((self.model_teacher, teacher_args), (self.model_theta, theta_args)):
            context = args.get("max_model_len") or model_context_length(model)
            args.setdefault("max_num_batched_tokens", max(8192, context))
        self.pair = LockstepPair.from_models(self.model_teacher, self.model_theta,
                                             len(self.tokenizer), self.stop_token_ids,
                                             teacher_args, theta_args)

    def _row_requests(self, prompts: list[str], theta_prompts: list[str], max_tokens: int,
                      formats: tuple[PromptFormat, PromptFormat]
                      ) -> tuple[list[PairRequest], list[str | None], list[list[int]],
                                 list[list[int]]]:
        """Render both prompts per row; rows that cannot run get an error instead."""
        requests, errors, teacher_ids, theta_ids = [], [], [], []
        engines = (("teacher", self.pair.teacher, formats[0]),
                   ("theta", self.pair.theta, formats[1]))
        for index, texts in enumerate(zip(prompts, theta_prompts)):
            error, rendered = None, []
            for (role, engine, prompt_format), text in zip(engines, texts):
                if not isinstance(text, str) or not text.strip():
                    error = error or f"row {index}: {role} prompt is empty"
                    rendered.append([])
                    continue
                ids = render_prompt_ids(self.tokenizer, text, prompt_format)
                if len(ids) >= engine.max_model_len:
                    error = error or (f"row {index}: {role} prompt has {len(ids)} tokens; the "
                                      f"{role} context is {engine.max_model_len} tokens, leaving "
                                      "no room to generate")
                rendered.append(ids)
            teacher_ids.append(rendered[0])
            theta_ids.append(rendered[1])
            if error is None:
                room = min(self.pair.teacher.max_model_len - len(rendered[0]),
                           self.pair.theta.max_model_len - len(rendered[1]))
                request = PairRequest(index, rendered[0], rendered[1], min(max_tokens, room))
                capacity = self.pair.capacity_error(request)
                if capacity:
                    error = f"row {index}: {capacity}"
                else:
                    requests.append(request)
            errors.append(error)
        return requests, errors, teacher_ids, theta_ids

    def generate(self, prompts: list[str], theta_prompts: list[str] | None = None,
                 max_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, seed: int | None = None, show_progress: bool = True, *,
                 mixing: MixingConfig | None = None, teacher_format: PromptFormat | None = None,
                 theta_format: PromptFormat | None = None) -> OptimalSamplingOutput:
        """Generate one sequence per prompt; `theta_prompts[i]` is what theta sees for row i.

        `mixing`, `teacher_format` and `theta_format` override, for this call only, the
        constructor's alpha settings (and temperature, top-k, top-p) and prompt formats, so
        one engine pair can serve several datasets.
        """
        if theta_prompts is None:
            theta_prompts = prompts
        if len(theta_prompts) != len(prompts):
            raise ConfigError(f"theta_prompts: {len(theta_prompts)} entries for "
                              f"{len(prompts)} prompts")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens: {max_tokens} must be at least 1")
        config = mixing or MixingConfig(**{**self.mixing_defaults.__dict__,
                                           "temperature": temperature, "top_p": top_p,
                                           "top_k": top_k})
        formats = (teacher_format or self.teacher_format, theta_format or self.theta_format)
        seed = secrets.randbits(63) if seed is None else int(seed)
        requests, errors, teacher_ids, theta_ids = self._row_requests(
            list(prompts), list(theta_prompts), max_tokens, formats)
        for error in filter(None, errors):
            logger.warning("rejected %s", error)
        traces = self.pair.generate(requests, config, seed, show_progress) if requests else {}
        return self._assemble(len(prompts), traces, errors, seed, teacher_ids, theta_ids)

    def _assemble(self, rows: int, traces: dict[int, PairTrace], errors: list[str | None],
                  seed: int, teacher_ids: list[list[int]], theta_ids: list[list[int]]
                  ) -> OptimalSamplingOutput:
        empty = PairTrace(np.zeros((0, 5)), REJECTED)
        ordered = [traces.get(index, empty) for index in range(rows)]
        token_ids = [trace.columns[:, 0].astype(np.int64).tolist() for trace in ordered]
        alphas = [trace.columns[:, 1] for trace in ordered]
        track = self.track_alpha_stats
        return OptimalSamplingOutput(
            generated_texts=[self.tokenizer.decode(ids, skip_special_tokens=True)
                             for ids in token_ids],
            generated_ids=token_ids,
            num_tokens=[len(ids) for ids in token_ids],
            finish_reasons=[trace.finish_reason for trace in ordered],
            errors=errors,
            alpha_history=[a.tolist() for a in alphas] if track else [],
            mixed_logprobs=[trace.columns[:, 2].tolist() for trace in ordered],
            teacher_logprobs=[trace.columns[:, 3].tolist() for trace in ordered],
            theta_logprobs=[trace.columns[:, 4].tolist() for trace in ordered],
            alpha_stats=summarize_alpha(np.concatenate(alphas)) if track else None,
            per_row_alpha_stats=[summarize_alpha(a) for a in alphas] if track else [],
            seed=seed,
            teacher_prompt_ids=teacher_ids,
            theta_prompt_ids=theta_ids,
        )
