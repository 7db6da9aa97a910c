"""Two vLLM engines stepped together, one jointly drawn token per sequence and step.

A step has two halves. Launch: admit queued pairs into both engines only while both can take
them this step (sequence slots, token budget for an unchunked prefill, KV blocks), so neither
scheduler chunks, delays or preempts one of them; schedule the teacher and launch its forward
pass; schedule theta, check both engines scheduled the same pairs the same way, and launch its
forward pass; align theta's rows to the teacher's, compute q and draw one token per pair; let
each engine sample with every logit but the drawn token masked. Retire: hand each engine its
output (finished pairs free their KV blocks), check that both appended the drawn tokens and
finished the same pairs, and record the step.

KV blocks on actual use, as vLLM's own scheduler holds them: a pair holds blocks for its
current length (prompt + tokens drawn) in each engine, tracked for every pair of the call in
numpy arrays. A queued pair is admitted while both engines have blocks for every active
pair's length plus one token (the next step) plus a watermark of `KV_WATERMARK` of the
blocks, waived for a pair admitted alone. Before a step is scheduled, if either engine would
run short, the lockstep preempts the most recently admitted pairs (first admission; a
resumed pair keeps its place) in BOTH engines at once (aborts them), requeues them at the
front, and later resumes each by adding prompt + the tokens recorded so far as the prompt of
a new request in both engines, max_tokens reduced by as many: no recorded token is drawn
again and the pair's records continue where they stopped. Neither engine ever preempts on
its own, so every lockstep check holds at every step. A pair preempted while a step is in
flight (every preemption: the step before is always launched) loses that step's draw: both
engines drop its output and it is not recorded; the resumed pair draws that position again,
with the same key. A resumed pair's requests get a new id (`pair-<index>-<n>`), so the
output of its aborted request in the step in flight can never reach them. A resumed prompt
is prefilled unchunked like any other: `capacity_error` refuses a request whose prompt +
max_tokens − 1 exceeds max_num_batched_tokens (vLLM already refuses engines whose
max_num_batched_tokens is below max_model_len when chunked prefill is off, as here).

A request longer than either context gets max_tokens capped to the room left in both (it
ends with "length" in both engines at once); a prompt that leaves no room is refused with
`ConfigError` naming the row, before any engine sees the call.

Draws keyed by identity: a pair's token at position j is drawn with the key
`sampler.mixing.draw_keys(seed, pair key, j)`, so a row's tokens do not depend on the step,
the batch, admission order, preemption or the card (up to the logits themselves).

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
import dataclasses
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

from sampler import soft_targets
from sampler.errors import (BrokenPairError, ConfigError, IncompatibleModelsError, LockstepError,
                            MixingError)
from sampler.mixing import (TRACE_COLUMNS, GraphedMixing, MixedDraw, MixingConfig, draw_keys,
                            mix_and_draw, unmixable_rows)
from sampler.placement import Engine, on_tensor_parallel_workers, place_engine
from sampler.vllm_internals import StepResult

logger = logging.getLogger(__name__)

#: Share of an engine's KV blocks kept free when admitting beside other pairs: room for the
#: active pairs to grow for a while (at 256 pairs of 16-token blocks, 1% of a 1.1 M-token
#: cache is ~44 steps), so that a pair just admitted is not preempted a few steps later and
#: its prefill wasted. vLLM V0's default watermark.
KV_WATERMARK = 0.01


@dataclass(frozen=True)
class PairRequest:
    """One sequence to generate: the caller's row index, both models' prompt ids, and the
    row's own draw key (a stable hash of the row's identity; None: the index)."""

    index: int
    teacher_prompt_ids: list[int]
    theta_prompt_ids: list[int]
    max_tokens: int
    key: int | None = None

    def __post_init__(self) -> None:
        if self.key is None:
            object.__setattr__(self, "key", self.index)


@dataclass
class PairTrace:
    """A finished sequence: per-token columns (`TRACE_COLUMNS`) and its finish reason."""

    columns: np.ndarray
    finish_reason: str

    def column(self, name: str) -> np.ndarray:
        """One per-token column, by its `TRACE_COLUMNS` name."""
        return self.columns[:, TRACE_COLUMNS.index(name)]

    def soft_targets(self, k: int) -> dict[str, np.ndarray]:
        """The `sampler.soft_targets` columns of a call with `top_logprobs=k`."""
        return soft_targets.split_soft_targets(self.columns[:, len(TRACE_COLUMNS):], k)


@dataclass
class _StepLog:
    """Per-step rows, assembled into per-pair traces once at the end."""

    pair_indices: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def add(self, pair_indices: np.ndarray, values: np.ndarray) -> None:
        self.pair_indices.append(pair_indices)
        self.values.append(values)

    def token_ids(self, pair_index: int) -> list[int]:
        """The tokens recorded so far for one pair, in order (to resume it). The parts
        are joined into one, so that the next resume concatenates only what came since."""
        if not self.values:
            return []
        if len(self.values) > 1:
            self.pair_indices = [np.concatenate(self.pair_indices)]
            self.values = [np.concatenate(self.values)]
        mine = self.pair_indices[0] == pair_index
        return self.values[0][mine, 0].astype(np.int64).tolist()

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


class _PairTable:
    """Every pair of a call, one numpy array per quantity, indexed by slot (the request's
    position in the call): what admission, preemption and the draw keys need, updated a
    whole step at a time."""

    def __init__(self, requests: list[PairRequest]):
        self.requests = requests
        indices = np.array([request.index for request in requests], dtype=np.int64)
        self._order = np.argsort(indices, kind="stable")
        self._sorted = indices[self._order]
        if np.any(self._sorted[1:] == self._sorted[:-1]):
            duplicate = int(self._sorted[1:][self._sorted[1:] == self._sorted[:-1]][0])
            raise ConfigError(f"row {duplicate}: two requests share the index {duplicate}")
        self.keys = np.array([request.key for request in requests], dtype=np.int64)
        self.prompt = {"teacher": np.array([len(r.teacher_prompt_ids) for r in requests],
                                           dtype=np.int64),
                       "theta": np.array([len(r.theta_prompt_ids) for r in requests],
                                         dtype=np.int64)}
        #: Tokens drawn so far (the step in flight included), and of them recorded.
        self.drawn = np.zeros(len(requests), dtype=np.int64)
        self.recorded = np.zeros(len(requests), dtype=np.int64)
        #: Order of first admission (-1: never admitted); whether in the engines now.
        self.admitted_at = np.full(len(requests), -1, dtype=np.int64)
        self.active = np.zeros(len(requests), dtype=bool)
        self.resumes = np.zeros(len(requests), dtype=np.int64)

    def request_id(self, slot: int) -> str:
        """The engines' id of a slot's current request."""
        index, resumes = self.requests[slot].index, int(self.resumes[slot])
        return f"pair-{index}" if not resumes else f"pair-{index}-{resumes}"

    def slots(self, pair_indices: np.ndarray) -> np.ndarray:
        return self._order[np.searchsorted(self._sorted, pair_indices)]

    def blocks(self, role: str, slots: np.ndarray, block_size: int, ahead: int = 0
               ) -> np.ndarray:
        """KV blocks each pair holds in an engine at its next step (`ahead` tokens more)."""
        return -(-(self.prompt[role][slots] + self.drawn[slots] + ahead) // block_size)


@dataclass
class _Run:
    """The state of one `generate` call."""

    pairs: _PairTable
    queue: deque[int]
    stop_token_ids: list[int]
    progress: tqdm
    config: MixingConfig
    seed: int
    top_logprobs: int
    active: dict[str, PairRequest] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    log: _StepLog = field(default_factory=_StepLog)
    admissions: int = 0
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
    slots: np.ndarray | None = None
    values: _HostCopy | None = None


def _check_mixable(step: int, pair_indices: np.ndarray, values: np.ndarray) -> None:
    """Raise `MixingError` naming the rows whose α or log q(y) is not finite."""
    bad = unmixable_rows(values)
    if bad.size:
        rows = sorted(int(index) for index in pair_indices[bad])
        raise MixingError(
            f"row {rows[0]} (of rows {rows}) cannot be mixed at step {step}: teacher and theta "
            "give no token a non-zero probability together, or a logit is NaN")


def _to_device(values: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Integer indices on the device, copied without making the host wait for the device."""
    tensor = torch.as_tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
        #: Pairs preempted (in both engines) and resumed, over every call.
        self.preemptions = 0
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

    @staticmethod
    def usable_blocks(engine: Engine) -> int:
        """KV blocks an engine can give requests (vLLM keeps one back as its null block)."""
        return engine.num_kv_blocks - 1

    def capacity_error(self, request: PairRequest) -> str | None:
        """Why this pair can never run to its end, even alone; None if it can."""
        for role, engine, prompt in (("teacher", self.teacher, request.teacher_prompt_ids),
                                     ("theta", self.theta, request.theta_prompt_ids)):
            length = len(prompt) + request.max_tokens
            blocks = math.ceil(length / engine.block_size)
            if blocks > self.usable_blocks(engine):
                return (f"{role} needs {blocks} KV-cache blocks for a {len(prompt)}-token prompt "
                        f"plus {request.max_tokens} new tokens; the engine has "
                        f"{self.usable_blocks(engine)}")
            if length - 1 > engine.max_batched_tokens:
                return (f"{role} prompt of {len(prompt)} tokens plus {request.max_tokens - 1} "
                        f"drawn before a preemption ({length - 1} tokens to resume unchunked) "
                        f"exceeds the engine's max_num_batched_tokens "
                        f"({engine.max_batched_tokens})")
        return None

    def _checked_requests(self, requests: list[PairRequest]) -> list[PairRequest]:
        """Each request with max_tokens capped to the room in both contexts; `ConfigError`
        naming the row, the engine and the numbers for one that cannot run. Before any
        engine sees a request."""
        checked = []
        for request in requests:
            room = {}
            for role, engine, prompt in (
                    ("teacher", self.teacher, request.teacher_prompt_ids),
                    ("theta", self.theta, request.theta_prompt_ids)):
                if not prompt:
                    raise ConfigError(f"row {request.index}: {role} prompt is empty")
                room[role] = engine.max_model_len - len(prompt)
                if room[role] < 1:
                    raise ConfigError(
                        f"row {request.index}: {role} prompt has {len(prompt)} tokens; the "
                        f"{role} context is {engine.max_model_len} tokens, leaving no room "
                        "to generate")
            if request.max_tokens < 1:
                raise ConfigError(f"row {request.index}: max_tokens {request.max_tokens} must "
                                  "be at least 1")
            capped = min(request.max_tokens, *room.values())
            if capped < request.max_tokens:
                logger.info("row %d: max_tokens %d capped to %d, the room left in the %s context",
                            request.index, request.max_tokens, capped, min(room, key=room.get))
                request = dataclasses.replace(request, max_tokens=capped)
            problem = self.capacity_error(request)
            if problem:
                raise ConfigError(f"row {request.index}: {problem}")
            checked.append(request)
        return checked

    def generate(self, requests: list[PairRequest], config: MixingConfig, seed: int,
                 show_progress: bool = True, stop_token_ids: list[int] | None = None,
                 top_logprobs: int = 0) -> dict[int, PairTrace]:
        """Generate every request; returns traces keyed by request index.

        A request longer than either context gets max_tokens capped to the room in both (it
        finishes with "length"); one whose prompt leaves no room, or that cannot run even
        alone, is refused with `ConfigError` naming the row before any engine sees it.
        `stop_token_ids` replaces the pair's stop tokens for this call ([] ignores EOS).
        `top_logprobs` > 0 appends each model's k most likely tokens to every record
        (`PairTrace.soft_targets`).
        """
        if self.failure is not None:
            raise BrokenPairError(
                f"this engine pair failed in an earlier call ({type(self.failure).__name__}: "
                f"{self.failure}) and may hold a half-finished step; build a new pair")
        requests = self._checked_requests(requests)
        run = _Run(pairs=_PairTable(requests), queue=deque(range(len(requests))),
                   stop_token_ids=self.stop_token_ids if stop_token_ids is None
                   else stop_token_ids,
                   progress=tqdm(total=len(requests), desc="mixed sampling", unit="seq",
                                 disable=not show_progress),
                   config=config, seed=seed, top_logprobs=top_logprobs)
        in_flight: _Step | None = None
        try:
            while True:
                self._preempt_if_short(run)
                if self.overlapped:
                    step = self._launch(run, in_flight) if run.queue or run.active else None
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
                        self._launch_theta(step, run)
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

    def _launch(self, run: _Run, retiring: _Step | None) -> _Step:
        """The whole launch half of a step (overlapped order); `retiring` is the step before,
        whose update an engine process is sent straight after this step's schedule."""
        step = self._launch_teacher(run, retiring)
        self._launch_theta(step, run)
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

    def _launch_theta(self, step: _Step, run: _Run) -> None:
        """Schedule theta, check it matches the teacher, launch its forward pass, mix and force."""
        with self._phase("theta_host"):
            self._check_schedules(step.teacher_plan, step.theta_plan, step.admitted)
        with self._phase("theta_forward", self.theta.device):
            step.theta_output = self.theta.execute(step.theta_plan)
        if step.has_logits != (step.theta_output is None):
            raise LockstepError(f"step {step.number}: only one engine produced logits")
        if step.has_logits:
            self._mix_and_force(step, run)

    def _retire_teacher(self, step: _Step, run: _Run) -> StepResult:
        """Give the teacher its output; finished pairs leave the active set."""
        with self._phase("teacher_host"):
            result = self.teacher.update(step.teacher_plan, step.teacher_output)
            for request_id, reason in result.finish_reasons.items():
                request = run.active.pop(request_id)
                run.pairs.active[run.pairs.slots(np.array([request.index]))] = False
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
                run.pairs.recorded[step.slots[appended]] += 1
            run.progress.update(len(teacher_result.finish_reasons))

    def _active_slots(self, run: _Run) -> np.ndarray:
        """Slots of the pairs in the engines, first admitted first."""
        slots = np.flatnonzero(run.pairs.active)
        return slots[np.argsort(run.pairs.admitted_at[slots], kind="stable")]

    def _preempt_if_short(self, run: _Run) -> None:
        """Before a step is scheduled: if either engine lacks the blocks that every active
        pair needs at it, abort the most recently admitted pairs in both engines and requeue
        them at the front (resumed by `_admit`). Counts the pairs finishing at the step in
        flight too (an engine frees their blocks only when it is updated)."""
        slots = self._active_slots(run)
        if not slots.size:
            return
        fits = np.ones(slots.size, dtype=bool)
        for role, engine in (("teacher", self.teacher), ("theta", self.theta)):
            held = np.cumsum(run.pairs.blocks(role, slots, engine.block_size))
            fits &= held <= self.usable_blocks(engine)
        if fits.all():
            return
        victims = slots[~fits]
        request_ids = [run.pairs.request_id(slot) for slot in victims.tolist()]
        for engine in (self.teacher, self.theta):
            engine.abort(request_ids)
        for request_id in request_ids:
            del run.active[request_id]
        run.pairs.active[victims] = False
        run.pairs.drawn[victims] = run.pairs.recorded[victims]
        run.pairs.resumes[victims] += 1
        run.queue.extendleft(victims[::-1].tolist())
        self.preemptions += victims.size
        logger.info("step %d: KV cache short; preempted %d pairs in both engines (%s)",
                    run.steps, victims.size, ", ".join(request_ids))

    def _resumable(self, run: _Run, slot: int) -> PairRequest:
        """The engines' request for a slot: the caller's, or for a pair preempted after
        drawing r tokens, prompt + those tokens with max_tokens reduced by r."""
        request = run.pairs.requests[slot]
        recorded = int(run.pairs.recorded[slot])
        if not recorded:
            return request
        tokens = run.log.token_ids(request.index)
        if len(tokens) != recorded:
            raise LockstepError(f"pair {request.index}: {len(tokens)} tokens logged, "
                                f"{recorded} recorded")
        return dataclasses.replace(request, teacher_prompt_ids=request.teacher_prompt_ids + tokens,
                                   theta_prompt_ids=request.theta_prompt_ids + tokens,
                                   max_tokens=request.max_tokens - recorded)

    def _admit(self, run: _Run) -> dict[str, PairRequest]:
        """Add queued pairs to both engines while both have sequence slots, token budget
        for an unchunked prefill, and KV blocks (module docstring) for them from this step."""
        pairs, queue, active = run.pairs, run.queue, run.active
        admitted: dict[str, PairRequest] = {}
        prefill = {"teacher": 0, "theta": 0}
        engines = {"teacher": self.teacher, "theta": self.theta}
        slots = np.flatnonzero(pairs.active)
        held = {role: int(pairs.blocks(role, slots, engine.block_size, ahead=1).sum())
                for role, engine in engines.items()}
        while queue and len(active) < self.max_active:
            slot = queue[0]
            # from the lengths alone: the resumed prompt is built only for a pair that fits
            lengths = {role: int(pairs.prompt[role][slot] + pairs.recorded[slot])
                       for role in engines}
            needs = {role: math.ceil((lengths[role] + 1) / engine.block_size)
                     for role, engine in engines.items()}
            fits = all(
                held[role] + needs[role]
                + (math.ceil(KV_WATERMARK * engine.num_kv_blocks) if active else 0)
                <= self.usable_blocks(engine)
                and (len(active) - len(admitted)) + prefill[role] + lengths[role]
                <= engine.max_batched_tokens
                for role, engine in engines.items())
            if not fits:
                break
            queue.popleft()
            request = self._resumable(run, slot)
            prompts = {"teacher": request.teacher_prompt_ids, "theta": request.theta_prompt_ids}
            request_id = pairs.request_id(slot)
            for role, engine in engines.items():
                engine.add_request(request_id, prompts[role], request.max_tokens,
                                   run.stop_token_ids)
                held[role] += needs[role]
                prefill[role] += len(prompts[role])
            if pairs.admitted_at[slot] < 0:
                pairs.admitted_at[slot] = run.admissions
                run.admissions += 1
            pairs.active[slot] = True
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

    def _mix_and_force(self, step: _Step, run: _Run) -> None:
        """Draw one token per pair from q and force it in both engines, without waiting."""
        teacher_logits, teacher_rows = self.teacher.pending_logits()
        theta_logits, theta_rows = self.theta.pending_logits()
        device = teacher_logits.device
        step.rows = tuple(teacher_rows)
        step.alignment = alignment = self._alignment(step.rows, tuple(theta_rows), device)
        step.slots = run.pairs.slots(alignment.pair_indices)
        keys = draw_keys(run.seed, run.pairs.keys[step.slots], run.pairs.drawn[step.slots])
        run.pairs.drawn[step.slots] += 1
        with self._phase("mixing", device):
            draw, record = self._mix(teacher_logits, theta_logits, alignment, run.config,
                                     _to_device(keys, device))
            if run.top_logprobs:
                aligned = (theta_logits if alignment.theta_for_teacher is None
                           else theta_logits[alignment.theta_for_teacher])
                record = torch.cat([record, soft_targets.top_logprobs(
                    teacher_logits, aligned, self.vocab_size, run.top_logprobs)], dim=1)
        with self._phase("sample", device):
            step.teacher_output = self.teacher.sample_forced(draw.token_ids)
            step.theta_output = self.theta.sample_forced(
                draw.token_ids if alignment.teacher_for_theta is None
                else draw.token_ids[alignment.teacher_for_theta])
            step.values = _HostCopy(record)

    def _mix(self, teacher_logits: torch.Tensor, theta_logits: torch.Tensor,
             alignment: Alignment, config: MixingConfig, keys: torch.Tensor
             ) -> tuple[MixedDraw, torch.Tensor]:
        """The draw in teacher row order and its record ([rows, len(TRACE_COLUMNS)] float64)."""
        if self.graphed_mixing is not None and self.graphed_mixing.applies(teacher_logits,
                                                                            config):
            return self.graphed_mixing(teacher_logits, theta_logits, alignment.theta_for_teacher,
                                       config, keys)
        if alignment.theta_for_teacher is not None:
            theta_logits = theta_logits[alignment.theta_for_teacher]
        draw = mix_and_draw(teacher_logits, theta_logits, self.vocab_size, config, keys)
        return draw, draw.record()

    def _alignment(self, teacher_rows: tuple[str, ...], theta_rows: tuple[str, ...],
                   device: torch.device) -> Alignment:
        """How the engines' rows correspond; reused while the rows are unchanged."""
        key = (teacher_rows, theta_rows)
        if self._cached_alignment is not None and self._cached_alignment[0] == key:
            return self._cached_alignment[1]
        if sorted(teacher_rows) != sorted(theta_rows):
            raise LockstepError(f"logit rows differ: teacher {teacher_rows}, theta {theta_rows}")
        pair_indices = np.array([int(r.split("-")[1]) for r in teacher_rows], dtype=np.int64)
        row_position = {request_id: row for row, request_id in enumerate(teacher_rows)}
        theta_for_teacher = teacher_for_theta = None
        if teacher_rows != theta_rows:
            theta_position = {request_id: row for row, request_id in enumerate(theta_rows)}
            theta_for_teacher = _to_device([theta_position[r] for r in teacher_rows], device)
            teacher_for_theta = _to_device([row_position[r] for r in theta_rows], device)
        alignment = Alignment(pair_indices, theta_for_teacher, teacher_for_theta, row_position)
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
