"""Two vLLM engines stepped together, one jointly drawn token per sequence and step.

A step has two halves. Launch: admit queued pairs into both engines only while both can take
them whole (sequence slots, token budget for an unchunked prefill, KV blocks reserved for the
pair's full length), so neither scheduler chunks, delays or preempts one of them; schedule the
teacher and launch its forward pass; schedule theta, check both engines scheduled the same
pairs the same way, and launch its forward pass; align theta's rows to the teacher's, compute
q and draw one token per pair (randomness fixed by a per-step seed and each pair's rank in
pair order); let each engine sample with every logit but the drawn token masked. Retire: hand
each engine its output (finished pairs release their reservations), check that both appended
the drawn tokens and finished the same pairs, and record the step.

The halves are ordered to keep the device busy:

- overlapped (both engines use async scheduling, as on CUDA): launch step n, then retire step
  n−1 while step n runs on the device; nothing in the launch half waits for the device, so
  all host work of a step hides behind the device work of the previous one. A pair that
  stopped at step n−1 is already scheduled for step n (vLLM's async scheduler learns of the
  stop one step late); that extra token is drawn, discarded by both engines and not recorded;
- serial (the CPU build): retire the teacher's half of step n−1, launch the teacher's step n,
  then retire theta's half of step n−1 while the teacher's forward pass runs, and launch the
  rest of step n.

Each engine sits where `sampler.placement` puts it (this process, its own process, or
tensor-parallel workers) and is called the same way in the same order: at the start of the
launch half both engines are asked for step n (`schedule` returns at once) and then sent
step n−1's update (`begin_update`), before the teacher's forward pass. An engine in its own
process (`theta_process`, `teacher_process`; CUDA, overlapped) thus sees schedule(n),
update(n−1), force(n): its bookkeeping runs while this process mixes, and its update's
reply is read in the retire half. An engine in this process schedules when its plan is
first described or executed, so its order is as if it scheduled there. A tensor-parallel
engine steps serially, so a pair with one runs serial steps.

Each engine keeps its own KV cache and is never re-run over a prefix. Any disagreement raises
`LockstepError` with the details; there is no fallback. A row the mixing cannot serve (its
α or log q(y) is not finite) raises `MixingError` naming the row, at the retire half that
first sees it. A call that fails for any reason leaves the pair refusing further calls
(`BrokenPairError`, naming the first failure): the engines may hold a half-finished step,
which vLLM would refuse anyway with a message that hides the cause. Build a new pair.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sampler.errors import BrokenPairError, IncompatibleModelsError, LockstepError, MixingError
from sampler.mixing import (TRACE_COLUMNS, GraphedMixing, MixedDraw, MixingConfig, mix_and_draw,
                            unmixable_rows)
from sampler.placement import Engine, on_tensor_parallel_workers, place_engine
from sampler.vllm_internals import StepResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairRequest:
    """One sequence to generate: the caller's row index and both models' prompt ids."""

    index: int
    teacher_prompt_ids: list[int]
    theta_prompt_ids: list[int]
    max_tokens: int


@dataclass
class PairTrace:
    """A finished sequence: per-token columns (`TRACE_COLUMNS`) and its finish reason."""

    columns: np.ndarray
    finish_reason: str

    def column(self, name: str) -> np.ndarray:
        """One per-token column, by its `TRACE_COLUMNS` name."""
        return self.columns[:, TRACE_COLUMNS.index(name)]


@dataclass
class _StepLog:
    """Per-step rows, assembled into per-pair traces once at the end."""

    pair_indices: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def add(self, pair_indices: np.ndarray, values: np.ndarray) -> None:
        self.pair_indices.append(pair_indices)
        self.values.append(values)

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


class Alignment(NamedTuple):
    """How one step's logit rows of the two engines correspond."""

    pair_indices: np.ndarray                 # [rows] pair index of each teacher row
    ranks: torch.Tensor                      # [rows] each teacher row's rank in pair order
    theta_for_teacher: torch.Tensor | None   # [rows] theta row of each teacher row; None: alike
    teacher_for_theta: torch.Tensor | None   # [rows] the inverse permutation; None: alike
    row_position: dict[str, int]             # request id → teacher row


class _HostCopy:
    """A device tensor on its way to the host: the copy starts now, `get` waits for it."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def get(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


@dataclass
class _Run:
    """The state of one `generate` call."""

    queue: deque[PairRequest]
    stop_token_ids: list[int]
    progress: tqdm
    active: dict[str, PairRequest] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=lambda: {"teacher": 0, "theta": 0})
    finish_reasons: dict[int, str] = field(default_factory=dict)
    log: _StepLog = field(default_factory=_StepLog)
    steps: int = 0


@dataclass
class _Step:
    """One launched step, until it is retired."""

    number: int
    teacher_plan: object
    theta_plan: object
    admitted: dict[str, PairRequest]
    teacher_output: object = None
    theta_output: object = None
    has_logits: bool = False
    rows: tuple[str, ...] = ()
    alignment: Alignment | None = None
    values: _HostCopy | None = None


def _check_mixable(step: int, pair_indices: np.ndarray, values: np.ndarray) -> None:
    """Raise `MixingError` naming the rows whose α or log q(y) is not finite."""
    bad = unmixable_rows(values)
    if bad.size:
        rows = sorted(int(index) for index in pair_indices[bad])
        raise MixingError(
            f"row {rows[0]} (of rows {rows}) cannot be mixed at step {step}: teacher and theta "
            "give no token a non-zero probability together, or a logit is NaN")


def step_seed(seed: int, step: int) -> int:
    """A distinct 31-bit seed for each step of a call (Triton's RNG takes 32-bit seeds)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**31 - 1)


def _to_device(values: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Integer indices on the device, copied without making the host wait for the device."""
    tensor = torch.as_tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _request_id(index: int) -> str:
    return f"pair-{index}"


class LockstepPair:
    """Teacher and theta engines that generate the same token sequences together."""

    def __init__(self, teacher: Engine, theta: Engine, vocab_size: int,
                 stop_token_ids: list[int]):
        self.teacher = teacher
        self.theta = theta
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.max_active = min(teacher.max_num_seqs, theta.max_num_seqs)
        if teacher.overlaps_steps != theta.overlaps_steps:
            raise LockstepError(
                f"one engine schedules asynchronously and the other does not (teacher "
                f"{teacher.overlaps_steps}, theta {theta.overlaps_steps})")
        self.overlapped = teacher.overlaps_steps
        self.tokens_checked = 0
        self.steps_run = 0
        self.phase_seconds: dict[str, float] | None = None
        self._synchronise_phases = True
        self._cached_alignment: tuple[tuple, Alignment] | None = None
        #: CUDA graphs for the fused mixing (None on the CPU; set to None to launch eagerly).
        self.graphed_mixing = (GraphedMixing(vocab_size, self.max_active)
                               if teacher.device.type == "cuda" else None)
        self.failure: BaseException | None = None

    @classmethod
    def from_models(cls, model_teacher: str, model_theta: str, vocab_size: int | None,
                    stop_token_ids: list[int], teacher_args: dict, theta_args: dict,
                    overlap_steps: bool = True, theta_process: bool | None = None,
                    teacher_process: bool = False) -> LockstepPair:
        """Build both engines (teacher first), each with its own vLLM settings; mix over
        `vocab_size` or both logit widths.

        `overlap_steps` uses async scheduling where vLLM supports it (CUDA), else serial steps;
        an engine on tensor-parallel workers (`tensor_parallel_size` > 1, or
        `distributed_executor_backend="mp"`) steps serially, and then both do.
        `theta_process` and `teacher_process` run that engine in a worker process (CUDA with
        overlapped steps only), so that the engines' host work and this process's run at
        once (`sampler.engine_process`). None runs theta there wherever the teacher's engine
        came up on CUDA with overlapped steps. The teacher stays here unless asked: with
        both engines in workers, three processes share the device, and no H100 measured
        ran faster for it (benchmarks/RESULTS.md, run 11).
        """
        # multiprocessing marks a spawned process (an engine's) while it re-imports the
        # main script; a script that builds a pair at its top level would build a second one.
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise LockstepError(
                "an engine pair built while a process started with spawn (an engine's) re-imports "
                "the main script: build the sampler under "
                "`if __name__ == \"__main__\":`")
        on_workers = [on_tensor_parallel_workers(role, args)
                      for role, args in (("teacher", teacher_args), ("theta", theta_args))]
        if any(on_workers) and overlap_steps:
            logger.info("an engine on tensor-parallel workers steps serially: so do both")
            overlap_steps = False
        processes_possible = overlap_steps and torch.cuda.is_available()
        for role, wanted in (("teacher", teacher_process), ("theta", theta_process)):
            if wanted and not processes_possible:
                raise LockstepError(f"a {role} engine process needs CUDA and overlapped steps")
        logger.info("building teacher engine for %s", model_teacher)
        teacher = place_engine("teacher", model_teacher, teacher_args, teacher_process,
                               overlap_steps)
        if theta_process is None:
            theta_process = teacher.overlaps_steps and teacher.device.type == "cuda"
        logger.info("building theta engine for %s", model_theta)
        try:
            theta = place_engine("theta", model_theta, theta_args, theta_process, overlap_steps)
        except BaseException:
            teacher.shutdown()
            raise
        try:
            shared = min(teacher.logits_width, theta.logits_width)
            if vocab_size is not None and vocab_size > shared:
                raise IncompatibleModelsError(
                    f"the tokenizer has {vocab_size} tokens but the models give "
                    f"{teacher.logits_width} (teacher) and {theta.logits_width} (theta) logits")
            return cls(teacher, theta, vocab_size or shared, stop_token_ids)
        except BaseException:
            teacher.shutdown()
            theta.shutdown()
            raise

    def enable_phase_timing(self, synchronise: bool = True) -> None:
        """Time each phase of every step. `synchronise` waits for the device around device
        phases, so that they do not overlap (for profiling only); without it each phase's
        host time is measured, waits included, and the steps overlap as they do unprofiled."""
        self.phase_seconds = {}
        self._synchronise_phases = synchronise

    @contextlib.contextmanager
    def _phase(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        if self.phase_seconds is None:
            yield
            return
        synchronise = self._synchronise_phases and device is not None and device.type == "cuda"
        if synchronise:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if synchronise:
            torch.cuda.synchronize(device)
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def blocks_needed(self, engine: Engine, prompt_length: int, max_tokens: int) -> int:
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
        if self.failure is not None:
            raise BrokenPairError(
                f"this engine pair failed in an earlier call ({type(self.failure).__name__}: "
                f"{self.failure}) and may hold a half-finished step; build a new pair")
        run = _Run(queue=deque(requests),
                   stop_token_ids=self.stop_token_ids if stop_token_ids is None
                   else stop_token_ids,
                   progress=tqdm(total=len(requests), desc="mixed sampling", unit="seq",
                                 disable=not show_progress))
        in_flight: _Step | None = None
        try:
            while True:
                if self.overlapped:
                    step = self._launch(run, config, seed, in_flight) \
                        if run.queue or run.active else None
                    if in_flight is not None:
                        if step is None:
                            self._begin_updates(in_flight)
                        self._retire_theta(in_flight, self._retire_teacher(in_flight, run), run)
                else:
                    teacher_result = (self._retire_teacher(in_flight, run)
                                      if in_flight is not None else None)
                    step = self._launch_teacher(run) if run.queue or run.active else None
                    if in_flight is not None:
                        self._retire_theta(in_flight, teacher_result, run)
                    if step is not None:
                        self._launch_theta(step, config, seed)
                if step is None and in_flight is None:
                    break
                in_flight = step
        except BaseException as error:
            self.failure = error
            self._abort(list(run.active))
            raise
        finally:
            run.progress.close()
        return run.log.traces(run.finish_reasons)

    def _launch(self, run: _Run, config: MixingConfig, seed: int,
                retiring: _Step | None) -> _Step:
        """The whole launch half of a step (overlapped order); `retiring` is the step before,
        whose update an engine process is sent straight after this step's schedule."""
        step = self._launch_teacher(run, retiring)
        self._launch_theta(step, config, seed)
        return step

    def _begin_updates(self, step: _Step) -> None:
        """Send the engines the step's update (an engine process starts it now; an engine
        in this process does it when it is retired)."""
        self.teacher.begin_update(step.teacher_plan, step.teacher_output)
        self.theta.begin_update(step.theta_plan, step.theta_output)

    def _launch_teacher(self, run: _Run, retiring: _Step | None = None) -> _Step:
        """Admit what fits, ask both engines for the step (each plan comes back at once),
        send them the update of `retiring`, and launch the teacher's forward pass."""
        device = self.teacher.device
        with self._phase("teacher_host"):
            admitted = self._admit(run)
            theta_plan = self.theta.schedule()
            step = _Step(number=run.steps, teacher_plan=self.teacher.schedule(),
                         admitted=admitted, theta_plan=theta_plan)
            if retiring is not None:
                self._begin_updates(retiring)
        with self._phase("teacher_forward", device):
            step.teacher_output = self.teacher.execute(step.teacher_plan)
            step.has_logits = step.teacher_output is None
        run.steps += 1
        self.steps_run += 1
        return step

    def _launch_theta(self, step: _Step, config: MixingConfig, seed: int) -> None:
        """Schedule theta, check it matches the teacher, launch its forward pass, mix and force."""
        with self._phase("theta_host"):
            self._check_schedules(step.teacher_plan, step.theta_plan, step.admitted)
        with self._phase("theta_forward", self.theta.device):
            step.theta_output = self.theta.execute(step.theta_plan)
        if step.has_logits != (step.theta_output is None):
            raise LockstepError(f"step {step.number}: only one engine produced logits")
        if step.has_logits:
            self._mix_and_force(step, config, step_seed(seed, step.number))

    def _retire_teacher(self, step: _Step, run: _Run) -> StepResult:
        """Give the teacher its output; finished pairs release their KV reservations."""
        with self._phase("teacher_host"):
            result = self.teacher.update(step.teacher_plan, step.teacher_output)
            for request_id, reason in result.finish_reasons.items():
                request = run.active.pop(request_id)
                run.reserved["teacher"] -= self.blocks_needed(
                    self.teacher, len(request.teacher_prompt_ids), request.max_tokens)
                run.reserved["theta"] -= self.blocks_needed(
                    self.theta, len(request.theta_prompt_ids), request.max_tokens)
                run.finish_reasons[request.index] = reason
        return result

    def _retire_theta(self, step: _Step, teacher_result: StepResult, run: _Run) -> None:
        """Give theta its output, check both engines appended the drawn tokens, record them."""
        with self._phase("theta_host"):
            theta_result = self.theta.update(step.theta_plan, step.theta_output)
            values = step.values.get() if step.has_logits else None
            appended = self._check_updates(step, values, teacher_result, theta_result, run.active)
            if values is not None:
                pair_indices = step.alignment.pair_indices
                _check_mixable(step.number, pair_indices[appended], values[appended])
                run.log.add(pair_indices[appended], values[appended])
            run.progress.update(len(teacher_result.finish_reasons))

    def _admit(self, run: _Run) -> dict[str, PairRequest]:
        """Add queued pairs to both engines while both can run them whole from this step."""
        queue, active, reserved = run.queue, run.active, run.reserved
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
                                   run.stop_token_ids)
                reserved[role] += self.blocks_needed(engine, len(prompts[role]),
                                                     request.max_tokens)
                prefill[role] += len(prompts[role])
            active[request_id] = request
            admitted[request_id] = request
        if not active and queue:
            raise LockstepError("no pair could be admitted into an empty engine pair")
        return admitted

    def _check_schedules(self, teacher_plan: object, theta_plan: object,
                         admitted: dict[str, PairRequest]) -> None:
        """Raise unless both engines scheduled exactly the same pairs, prefills unchunked."""
        teacher_new, teacher_running, teacher_preempted = self.teacher.describe(teacher_plan)
        theta_new, theta_running, theta_preempted = self.theta.describe(theta_plan)
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

    def _mix_and_force(self, step: _Step, config: MixingConfig, seed: int) -> None:
        """Draw one token per pair from q and force it in both engines, without waiting."""
        teacher_logits, teacher_rows = self.teacher.pending_logits()
        theta_logits, theta_rows = self.theta.pending_logits()
        device = teacher_logits.device
        step.rows = tuple(teacher_rows)
        step.alignment = alignment = self._alignment(step.rows, tuple(theta_rows), device)
        with self._phase("mixing", device):
            draw, record = self._mix(teacher_logits, theta_logits, alignment, config, seed)
        with self._phase("sample", device):
            step.teacher_output = self.teacher.sample_forced(draw.token_ids)
            step.theta_output = self.theta.sample_forced(
                draw.token_ids if alignment.teacher_for_theta is None
                else draw.token_ids[alignment.teacher_for_theta])
            step.values = _HostCopy(record)

    def _mix(self, teacher_logits: torch.Tensor, theta_logits: torch.Tensor,
             alignment: Alignment, config: MixingConfig, seed: int
             ) -> tuple[MixedDraw, torch.Tensor]:
        """The draw in teacher row order and its record ([rows, len(sampler.mixing.TRACE_COLUMNS)] float64)."""
        if self.graphed_mixing is not None and self.graphed_mixing.applies(teacher_logits,
                                                                            config):
            return self.graphed_mixing(teacher_logits, theta_logits, alignment.theta_for_teacher,
                                       config, seed, alignment.ranks)
        if alignment.theta_for_teacher is not None:
            theta_logits = theta_logits[alignment.theta_for_teacher]
        draw = mix_and_draw(teacher_logits, theta_logits, self.vocab_size, config, seed,
                            alignment.ranks)
        return draw, draw.record()

    def _alignment(self, teacher_rows: tuple[str, ...], theta_rows: tuple[str, ...],
                   device: torch.device) -> Alignment:
        """How the engines' rows correspond; reused while the rows are unchanged."""
        key = (teacher_rows, theta_rows)
        if self._cached_alignment is not None and self._cached_alignment[0] == key:
            return self._cached_alignment[1]
        if sorted(teacher_rows) != sorted(theta_rows):
            raise LockstepError(f"logit rows differ: teacher {teacher_rows}, theta {theta_rows}")
        pair_indices = np.array([int(r.rsplit("-", 1)[1]) for r in teacher_rows])
        ranks = _to_device(np.argsort(np.argsort(pair_indices)), device)
        row_position = {request_id: row for row, request_id in enumerate(teacher_rows)}
        theta_for_teacher = teacher_for_theta = None
        if teacher_rows != theta_rows:
            theta_position = {request_id: row for row, request_id in enumerate(theta_rows)}
            theta_for_teacher = _to_device([theta_position[r] for r in teacher_rows], device)
            teacher_for_theta = _to_device([row_position[r] for r in theta_rows], device)
        alignment = Alignment(pair_indices, ranks, theta_for_teacher, teacher_for_theta,
                              row_position)
        self._cached_alignment = (key, alignment)
        return alignment

    def _check_updates(self, step: _Step, values: np.ndarray | None, teacher_result: StepResult,
                       theta_result: StepResult, live: dict[str, PairRequest]) -> np.ndarray:
        """Raise unless both engines appended the same tokens, each one drawn for its pair at
        this step, to every pair still `live`, and finished the same pairs. Pairs that had
        stopped a step earlier (async scheduling) are drawn for and get nothing. Returns which
        of the step's rows got their drawn token (vectorised: no per-row Python beyond one
        lookup of each appended row)."""
        if (theta_result.request_ids != teacher_result.request_ids
                or theta_result.new_token_ids != teacher_result.new_token_ids) \
                and theta_result.tokens_by_request() != teacher_result.tokens_by_request():
            self._raise_wrong_tokens(step, values, teacher_result, theta_result)
        rows = len(step.rows)
        appended = np.zeros(rows, dtype=bool)
        if teacher_result.request_ids:
            if values is None or any(len(tokens) != 1
                                     for tokens in teacher_result.new_token_ids):
                self._raise_wrong_tokens(step, values, teacher_result, theta_result)
            row_position = step.alignment.row_position
            positions = np.fromiter((row_position.get(r, -1) for r in teacher_result.request_ids),
                                    dtype=np.int64, count=len(teacher_result.request_ids))
            if (positions < 0).any():
                self._raise_wrong_tokens(step, values, teacher_result, theta_result)
            tokens = np.fromiter(itertools.chain.from_iterable(teacher_result.new_token_ids),
                                 dtype=np.int64, count=len(positions))
            if not np.array_equal(values[positions, 0].astype(np.int64), tokens):
                self._raise_wrong_tokens(step, values, teacher_result, theta_result)
            appended[positions] = True
        if any(step.rows[row] in live for row in np.flatnonzero(~appended)):
            self._raise_wrong_tokens(step, values, teacher_result, theta_result)
        if teacher_result.finish_reasons != theta_result.finish_reasons:
            raise LockstepError(f"step {step.number}: engines finished different pairs: teacher "
                                f"{teacher_result.finish_reasons}, theta "
                                f"{theta_result.finish_reasons}")
        self.tokens_checked += len(teacher_result.request_ids)
        return appended

    @staticmethod
    def _raise_wrong_tokens(step: _Step, values: np.ndarray | None, teacher_result: StepResult,
                            theta_result: StepResult) -> None:
        drawn = ({} if values is None
                 else dict(zip(step.rows, values[:, 0].astype(np.int64).tolist())))
        raise LockstepError(
            f"step {step.number}: engines appended other tokens than drawn: drawn {drawn}, "
            f"teacher {teacher_result.tokens_by_request()}, "
            f"theta {theta_result.tokens_by_request()}")

    def shutdown(self) -> None:
        """Free both engines (vLLM's distributed state goes with them)."""
        for engine in (self.theta, self.teacher):
            engine.shutdown()

    def _abort(self, request_ids: list[str]) -> None:
        """Best effort after a failure: abort this call's pairs in both engines."""
        for engine in (self.teacher, self.theta):
            try:
                engine.abort(request_ids)
            except Exception:  # noqa: BLE001 - best effort after the real error
                logger.exception("could not abort requests after a failed step")
