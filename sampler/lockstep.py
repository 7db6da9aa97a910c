"""Two vLLM engines stepped together, one jointly drawn token per sequence and step.

Per step, in this order (the teacher's host work first, so that theta's host work runs
while the teacher's forward pass occupies the device):

1. teacher: update its scheduler with the previous step's output (finished pairs release
   their reservations); admit queued pairs into both engines only while both can take them
   whole this step (sequence slots, token budget for an unchunked prefill, KV blocks reserved
   for the pair's full length), so neither scheduler chunks, delays or preempts one of them;
   schedule the teacher and launch its forward pass;
2. theta: update its scheduler with the previous step's output and check that both engines
   appended the drawn tokens and finished the same pairs; schedule theta, check both engines
   scheduled the same pairs the same way, and launch its forward pass; each engine keeps its
   own KV cache and is never re-run over a prefix;
3. mix: align the theta rows to the teacher rows, compute q and draw one token per pair,
   with randomness fixed by a per-step seed and each pair's rank in pair order;
4. force: each engine samples with every logit but the drawn token masked.

Any disagreement raises `LockstepError` with the details; there is no fallback. After one,
build a new pair: the engines may hold a half-finished step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sampler.errors import IncompatibleModelsError, LockstepError
from sampler.mixing import MixingConfig, mix_and_draw
from sampler.vllm_internals import StepResult, SteppedEngine, build_llm

logger = logging.getLogger(__name__)

#: Per-token columns recorded for every generated token, in this order.
TRACE_COLUMNS = ("token_id", "alpha", "log_q", "log_teacher", "log_theta")


@dataclass(frozen=True)
class PairRequest:
    """One sequence to generate: the caller's row index and both models' prompt ids."""

    index: int
    teacher_prompt_ids: list[int]
    theta_prompt_ids: list[int]
    max_tokens: int


@dataclass
class PairTrace:
    """A finished sequence: per-token columns (see TRACE_COLUMNS) and its finish reason."""

    columns: np.ndarray
    finish_reason: str


@dataclass
class _StepLog:
    """Per-step rows, assembled into per-pair traces once at the end."""

    pair_indices: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def traces(self, finish_reasons: dict[int, str]) -> dict[int, PairTrace]:
        if not self.values:
            return {}
        indices = np.concatenate(self.pair_indices)
        values = np.concatenate(self.values)
        order = np.argsort(indices, kind="stable")
        indices, values = indices[order], values[order]
        starts = np.searchsorted(indices, list(finish_reasons), side="left")
        ends = np.searchsorted(indices, list(finish_reasons), side="right")
        return {pair: PairTrace(values[start:end], reason)
                for (pair, reason), start, end in zip(finish_reasons.items(), starts, ends)}


def step_seed(seed: int, step: int) -> int:
    """A distinct 31-bit seed for each step of a call (Triton's RNG takes 32-bit seeds)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**31 - 1)


def _request_id(index: int) -> str:
    return f"pair-{index}"


class LockstepPair:
    """Teacher and theta engines that generate the same token sequences together."""

    def __init__(self, teacher: SteppedEngine, theta: SteppedEngine, vocab_size: int,
                 stop_token_ids: list[int]):
        self.teacher = teacher
        self.theta = theta
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.max_active = min(teacher.max_num_seqs, theta.max_num_seqs)
        self.tokens_checked = 0
        self.steps_run = 0
        self.phase_seconds: dict[str, float] | None = None
        self._cached_alignment: tuple | None = None

    @classmethod
    def from_models(cls, model_teacher: str, model_theta: str, vocab_size: int | None,
                    stop_token_ids: list[int], teacher_args: dict, theta_args: dict
                    ) -> LockstepPair:
        """Build both engines (teacher first); mix over `vocab_size` or both logit widths."""
        logger.info("building teacher engine for %s", model_teacher)
        teacher = SteppedEngine(build_llm(model_teacher, teacher_args))
        logger.info("building theta engine for %s", model_theta)
        theta = SteppedEngine(build_llm(model_theta, theta_args))
        shared = min(teacher.logits_width, theta.logits_width)
        if vocab_size is not None and vocab_size > shared:
            raise IncompatibleModelsError(
                f"the tokenizer has {vocab_size} tokens but the models give {teacher.logits_width}"
                f" (teacher) and {theta.logits_width} (theta) logits")
        return cls(teacher, theta, vocab_size or shared, stop_token_ids)

    def enable_phase_timing(self) -> None:
        """Time each phase of every step (synchronising the device: for profiling only)."""
        self.phase_seconds = {}

    @contextlib.contextmanager
    def _phase(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        if self.phase_seconds is None:
            yield
            return
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def blocks_needed(self, engine: SteppedEngine, prompt_length: int, max_tokens: int) -> int:
        return math.ceil((prompt_length + max_tokens) / engine.block_size)

    def capacity_error(self, request: PairRequest) -> str | None:
        """Why this pair can never be admitted, even alone; None if it can."""
        for role, engine, prompt in (("teacher", self.teacher, request.teacher_prompt_ids),
                                     ("theta", self.theta, request.theta_prompt_ids)):
            blocks = self.blocks_needed(engine, len(prompt), request.max_tokens)
            if blocks > engine.num_kv_blocks:
                return (f"{role} needs {blocks} KV-cache blocks for a {len(prompt)}-token prompt "
                        f"plus {request.max_tokens} new tokens; the engine has "
                        f"{engine.num_kv_blocks}")
            if len(prompt) > engine.max_batched_tokens:
                return (f"{role} prompt of {len(prompt)} tokens exceeds the engine's "
                        f"max_num_batched_tokens ({engine.max_batched_tokens})")
        return None

    def generate(self, requests: list[PairRequest], config: MixingConfig, seed: int,
                 show_progress: bool = True, stop_token_ids: list[int] | None = None
                 ) -> dict[int, PairTrace]:
        """Generate every request; returns traces keyed by request index.

        `stop_token_ids` replaces the pair's stop tokens for this call ([] ignores EOS).
        """
        stops = self.stop_token_ids if stop_token_ids is None else stop_token_ids
        queue = deque(requests)
        active: dict[str, PairRequest] = {}
        reserved = {"teacher": 0, "theta": 0}
        finish_reasons: dict[int, str] = {}
        log = _StepLog()
        step = 0
        progress = tqdm(total=len(requests), desc="mixed sampling", unit="seq",
                        disable=not show_progress)
        try:
            device = self.teacher.device
            previous: tuple[object, object, dict[str, int]] | None = None
            while True:
                with self._phase("teacher_host"):
                    teacher_done = self.teacher.update(previous[0]) if previous else None
                    if teacher_done is not None:
                        for request_id in teacher_done.finish_reasons:
                            request = active.pop(request_id)
                            reserved["teacher"] -= self.blocks_needed(
                                self.teacher, len(request.teacher_prompt_ids), request.max_tokens)
                            reserved["theta"] -= self.blocks_needed(
                                self.theta, len(request.theta_prompt_ids), request.max_tokens)
                            finish_reasons[request.index] = teacher_done.finish_reasons[request_id]
                    teacher_plan = admitted = None
                    if queue or active:
                        admitted = self._admit(queue, active, reserved, stops)
                        teacher_plan = self.teacher.schedule()
                with self._phase("teacher_forward", device):
                    if teacher_plan is not None:
                        self.teacher.execute(teacher_plan)
                with self._phase("theta_host"):
                    if previous is not None:
                        self._check_updates(previous[2], teacher_done,
                                            self.theta.update(previous[1]))
                        progress.update(len(teacher_done.finish_reasons))
                    if teacher_plan is None:
                        break
                    theta_plan = self.theta.schedule()
                    self._check_schedules(teacher_plan, theta_plan, admitted)
                with self._phase("theta_forward", device):
                    self.theta.execute(theta_plan)
                teacher_logits, teacher_rows = self.teacher.pending_logits()
                theta_logits, theta_rows = self.theta.pending_logits()
                tokens = self._mix_and_force(teacher_logits, teacher_rows, theta_logits,
                                             theta_rows, config, step_seed(seed, step), log)
                previous = (teacher_plan, theta_plan, tokens)
                step += 1
                self.steps_run += 1
        except BaseException:
            self._abort(list(active))
            raise
        finally:
            progress.close()
        return log.traces(finish_reasons)

    def _admit(self, queue: deque[PairRequest], active: dict[str, PairRequest],
               reserved: dict[str, int], stop_token_ids: list[int]) -> dict[str, PairRequest]:
        """Add queued pairs to both engines while both can run them whole from this step."""
        admitted: dict[str, PairRequest] = {}
        prefill = {"teacher": 0, "theta": 0}
        engines = {"teacher": self.teacher, "theta": self.theta}
        while queue and len(active) < self.max_active:
            request = queue[0]
            prompts = {"teacher": request.teacher_prompt_ids, "theta": request.theta_prompt_ids}
            fits = all(
                reserved[role] + self.blocks_needed(engine, len(prompts[role]),
                                                    request.max_tokens) <= engine.num_kv_blocks
                and (len(active) - len(admitted)) + prefill[role] + len(prompts[role])
                <= engine.max_batched_tokens
                for role, engine in engines.items())
            if not fits:
                break
            queue.popleft()
            request_id = _request_id(request.index)
            for role, engine in engines.items():
                engine.add_request(request_id, prompts[role], request.max_tokens,
                                   stop_token_ids)
                reserved[role] += self.blocks_needed(engine, len(prompts[role]),
                                                     request.max_tokens)
                prefill[role] += len(prompts[role])
            active[request_id] = request
            admitted[request_id] = request
        if not active:
            raise LockstepError("no pair could be admitted into an empty engine pair")
        return admitted

    def _check_schedules(self, teacher_plan: object, theta_plan: object,
                         admitted: dict[str, PairRequest]) -> None:
        """Raise unless both engines scheduled exactly the same pairs, prefills unchunked."""
        teacher_new, teacher_running, teacher_preempted = self.teacher.describe_schedule(teacher_plan)
        theta_new, theta_running, theta_preempted = self.theta.describe_schedule(theta_plan)
        problems = []
        if set(teacher_new) != set(admitted) or set(theta_new) != set(admitted):
            problems.append(f"admitted {sorted(admitted)}, teacher started {sorted(teacher_new)}, "
                            f"theta started {sorted(theta_new)}")
        if set(teacher_running) != set(theta_running):
            problems.append(f"running differ: teacher {sorted(teacher_running)}, "
                            f"theta {sorted(theta_running)}")
        for request_id, request in admitted.items():
            if teacher_new.get(request_id) != len(request.teacher_prompt_ids) or \
                    theta_new.get(request_id) != len(request.theta_prompt_ids):
                problems.append(f"{request_id}: prefill chunked (teacher "
                                f"{teacher_new.get(request_id)}/{len(request.teacher_prompt_ids)},"
                                f" theta {theta_new.get(request_id)}/"
                                f"{len(request.theta_prompt_ids)} tokens)")
        chunked = {k: v for k, v in {**teacher_running, **theta_running}.items() if v != 1}
        if chunked:
            problems.append(f"running pairs scheduled for more than one token: {chunked}")
        if teacher_preempted or theta_preempted:
            problems.append(f"preempted: teacher {sorted(teacher_preempted)}, "
                            f"theta {sorted(theta_preempted)}")
        if problems:
            raise LockstepError("engines scheduled different work: " + "; ".join(problems))

    def _mix_and_force(self, teacher_logits: torch.Tensor, teacher_rows: list[str],
                       theta_logits: torch.Tensor, theta_rows: list[str], config: MixingConfig,
                       seed: int, log: _StepLog) -> dict[str, int]:
        """Draw one token per pair from q and force it in both engines; returns the tokens."""
        device = teacher_logits.device
        alignment = self._alignment(tuple(teacher_rows), tuple(theta_rows), device)
        pair_indices, rank_in_pair_order, theta_for_teacher, teacher_for_theta = alignment
        if theta_for_teacher is not None:
            theta_logits = theta_logits[theta_for_teacher]
        with self._phase("mixing", device):
            draw = mix_and_draw(teacher_logits, theta_logits, self.vocab_size, config, seed,
                                rank_in_pair_order)
        with self._phase("sample", device):
            self.teacher.sample_forced(draw.token_ids)
            self.theta.sample_forced(draw.token_ids if teacher_for_theta is None
                                     else draw.token_ids[teacher_for_theta])
            values = torch.stack([draw.token_ids.double(), draw.alpha.double(),
                                  draw.log_q.double(), draw.log_teacher.double(),
                                  draw.log_theta.double()], dim=1).cpu()
        log.pair_indices.append(pair_indices)
        log.values.append(values.numpy())
        return dict(zip(teacher_rows, values[:, 0].long().tolist()))

    def _alignment(self, teacher_rows: tuple[str, ...], theta_rows: tuple[str, ...],
                   device: torch.device) -> tuple:
        """Pair index and rank of each teacher row, and the row permutations between engines
        (None where both engines order their rows alike); reused while the rows are unchanged."""
        key = (teacher_rows, theta_rows)
        if self._cached_alignment is not None and self._cached_alignment[0] == key:
            return self._cached_alignment[1]
        if sorted(teacher_rows) != sorted(theta_rows):
            raise LockstepError(f"logit rows differ: teacher {teacher_rows}, theta {theta_rows}")
        pair_indices = np.array([int(r.rsplit("-", 1)[1]) for r in teacher_rows])
        ranks = torch.tensor(np.argsort(np.argsort(pair_indices)), device=device)
        theta_for_teacher = teacher_for_theta = None
        if teacher_rows != theta_rows:
            theta_position = {request_id: row for row, request_id in enumerate(theta_rows)}
            teacher_position = {request_id: row for row, request_id in enumerate(teacher_rows)}
            theta_for_teacher = torch.tensor([theta_position[r] for r in teacher_rows],
                                             device=device)
            teacher_for_theta = torch.tensor([teacher_position[r] for r in theta_rows],
                                             device=device)
        alignment = (pair_indices, ranks, theta_for_teacher, teacher_for_theta)
        self._cached_alignment = (key, alignment)
        return alignment

    def _check_updates(self, tokens: dict[str, int], teacher_result: StepResult,
                       theta_result: StepResult) -> None:
        """Raise unless both engines appended the drawn tokens and finished the same pairs."""
        expected = {request_id: [token] for request_id, token in tokens.items()}
        if teacher_result.new_token_ids != expected or theta_result.new_token_ids != expected:
            raise LockstepError(
                f"engines appended other tokens than drawn: drawn {expected}, teacher "
                f"{teacher_result.new_token_ids}, theta {theta_result.new_token_ids}")
        if teacher_result.finish_reasons != theta_result.finish_reasons:
            raise LockstepError(f"engines finished different pairs: teacher "
                                f"{teacher_result.finish_reasons}, theta "
                                f"{theta_result.finish_reasons}")
        self.tokens_checked += len(tokens)

    def _abort(self, request_ids: list[str]) -> None:
        """Best effort after a failure: abort this call's pairs in both engines."""
        for engine in (self.teacher, self.theta):
            try:
                engine.abort(request_ids)
            except Exception:  # noqa: BLE001 - best effort after the real error
                logger.exception("could not abort requests after a failed step")
