"""An engine in its own process, so that its host work runs beside the main process's.

Measured on one H100 (benchmarks/RESULTS.md, run 7): with both engines in one process the
host is busy for the whole step (21.6 ms of a 21.8 ms step for the 7B + 0.5B pair) while the
device is busy for 12.7 ms of it. vLLM's scheduling, input preparation and output bookkeeping
are Python: a thread cannot run them beside the other engine's, a process can. With theta
alone in a worker (runs 8–10) the main process still did the teacher's host work and the
lockstep's, one after the other; with both engines in workers it only mixes and checks.

`RemoteEngine` is one placement of `sampler.placement.Engine` (CUDA, overlapped steps only).
Each call sends a message and returns at once where it can; replies are read when the
lockstep needs them, so an engine's host work of a step runs while the main process works
on the other engine or the mixing. Logits and drawn tokens never leave the device: the
worker copies its logits into a buffer shared by CUDA IPC and records an inter-process
event; the main process's stream waits for that event before mixing, writes the drawn
tokens into a second shared buffer and records its own event, which the worker's stream
waits for before forcing them. Stream order alone then keeps each buffer from being
overwritten before it is read: the worker copies step n+1's logits only after it waited
for step n's tokens, and the main process writes step n+1's tokens only after it waited
for step n+1's logits.

Messages (main → worker): `schedule` (new requests; the worker adds them, schedules,
executes and shares its logits), `update` (of the step before: the lockstep sends it
straight after `schedule`, so the worker's bookkeeping runs while the main process mixes),
`force`, `abort`, `stats` (where the worker's time went), `shutdown`. Replies come in
request order and name their step, which the main process checks; a failure in the worker
comes back as `error` with its traceback, and a worker that exits or stops answering is
seen by the main process: each is raised there as `LockstepError`.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.multiprocessing  # noqa: F401 - lets pipes carry CUDA tensors and events by IPC

from sampler.errors import LockstepError
from sampler.vllm_internals import StepResult

logger = logging.getLogger(__name__)

#: Seconds the main process waits for the worker to build its engine.
START_TIMEOUT_S = 900
#: Seconds the main process waits for the worker to exit after `shutdown`.
STOP_TIMEOUT_S = 60
#: Seconds the main process waits for one reply of a running worker (a step takes well under
#: a second; longer means the worker hangs, and the run should fail rather than wait).
REPLY_TIMEOUT_S = 300


@dataclass
class _RemotePlan:
    """A step scheduled in the worker; its description arrives with the `scheduled` reply."""

    step: int
    new: dict[str, int] | None = None
    cached: dict[str, int] | None = None
    preempted: set[str] | None = None
    rows: list[str] | None = None
    has_logits: bool = False


class _RemoteOutput:
    """Stands for an output the worker holds (the lockstep only passes it back)."""


class RemoteEngine:
    """One engine (the teacher's or theta's: `role`), driven in a worker process through the
    `sampler.placement.Engine` calls the lockstep makes."""

    remote = True

    def __init__(self, role: Literal["teacher", "theta"], model: str,
                 engine_args: dict[str, Any], overlap_steps: bool):
        torch.cuda.init()
        self.role = role
        context = multiprocessing.get_context("spawn")
        self._connection, worker_end = context.Pipe()
        self._process = context.Process(target=_worker_main, name=f"{role}-engine",
                                        args=(worker_end, role, model, engine_args, overlap_steps),
                                        daemon=True)
        self._process.start()
        worker_end.close()
        self.wait_seconds = 0.0
        #: The part of `wait_seconds` spent on each kind of step reply ("scheduled", "updated").
        self.wait_seconds_by_reply: dict[str, float] = {}
        self._pending_requests: list[tuple] = []
        self._steps = 0
        self._unread: list[_RemotePlan] = []
        self._logits: torch.Tensor | None = None  # [max_num_seqs, logits width], the worker's
        self._logits_ready: torch.cuda.Event | None = None
        self._current: _RemotePlan | None = None
        try:
            self._start()
        except BaseException:
            self._stop_now()
            raise

    def _start(self) -> None:
        """Wait for the worker's engine; share the drawn-token buffer and its event."""
        if not self._connection.poll(START_TIMEOUT_S):
            raise LockstepError(f"the {self.role} engine process did not start in time")
        facts = self._reply("ready", timed=False)
        if not facts["overlaps_steps"]:
            raise LockstepError(f"a {self.role} engine process needs overlapped steps, and vLLM "
                                "turned async scheduling off for its engine")
        for name, value in facts.items():
            setattr(self, name, value)
        self.device = torch.device(facts["device"])
        # [max_num_seqs] int64: the drawn token of each of the engine's rows, in its order
        self._tokens = torch.zeros(self.max_num_seqs, dtype=torch.long, device=self.device)
        self._tokens_ready = torch.cuda.Event(interprocess=True)
        self._tokens_ready.record()  # an event is shared once it exists
        self._send(("buffers", self._tokens, self._tokens_ready))

    def _reap(self, grace_s: float = 0.0) -> bool:
        """Wait up to `grace_s` for the worker to exit, else kill it; True if it was killed."""
        self._process.join(grace_s)
        if not self._process.is_alive():
            return False
        self._process.kill()
        self._process.join()
        return True

    def _stop_now(self) -> None:
        """Kill the worker and reap it (a failed start leaves no engine to shut down)."""
        self._reap()
        self._connection.close()

    def _exited(self) -> LockstepError:
        """The error for a closed pipe: the worker has exited (reaped here, killed if not)."""
        if self._reap(STOP_TIMEOUT_S):
            return LockstepError(f"the {self.role} engine process closed its pipe without "
                                 "exiting; killed it")
        return LockstepError(f"the {self.role} engine process exited (exit code "
                             f"{self._process.exitcode})")

    def _send(self, message: tuple) -> None:
        try:
            self._connection.send(message)
        except OSError as error:
            raise self._exited() from error

    def _reply(self, expected: str, timed: bool = True) -> Any:
        """The next reply, which must be `expected`; `timed` counts the wait in
        `wait_seconds` (the waits of a step, not of a start or a `stats` request)."""
        start = time.perf_counter()
        if not self._connection.poll(REPLY_TIMEOUT_S):
            self._reap()
            raise LockstepError(f"the {self.role} engine process did not answer for "
                                f"{REPLY_TIMEOUT_S} s (waiting for {expected!r}); killed it")
        try:
            kind, payload = self._connection.recv()
        except (EOFError, OSError) as error:
            raise self._exited() from error
        if timed:
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            by_reply = self.wait_seconds_by_reply
            by_reply[expected] = by_reply.get(expected, 0.0) + waited
        if kind == "error":
            raise LockstepError(f"{self.role} engine process failed:\n{payload}")
        if kind != expected:
            raise LockstepError(f"{self.role} engine process replied {kind!r}, expected "
                                f"{expected!r}")
        return payload

    def add_request(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                    stop_token_ids: list[int]) -> None:
        self._pending_requests.append((request_id, prompt_token_ids, max_tokens,
                                       stop_token_ids))

    def schedule(self) -> _RemotePlan:
        """Send the step (with the requests added since the last one); returns at once."""
        plan = _RemotePlan(self._steps)
        self._steps += 1
        self._send(("schedule", plan.step, self._pending_requests))
        self._pending_requests = []
        self._unread.append(plan)
        return plan

    def _read_schedule(self, plan: _RemotePlan) -> None:
        while plan.rows is None:
            if not self._unread:
                raise LockstepError(f"the {self.role} engine process's schedule of step "
                                    f"{plan.step} is lost (an earlier reply failed)")
            pending = self._unread.pop(0)
            step, pending.new, pending.cached, pending.preempted, pending.rows, \
                pending.has_logits, shared = self._reply("scheduled")
            self._check_step(pending.step, step, "schedule")
            if shared is not None:
                self._logits, self._logits_ready = shared

    def describe(self, plan: _RemotePlan) -> tuple[dict[str, int], dict[str, int], set[str]]:
        self._read_schedule(plan)
        return plan.new, plan.cached, plan.preempted

    def execute(self, plan: _RemotePlan) -> _RemoteOutput | None:
        """The worker executed with `schedule`: None where its logits wait for sampling."""
        self._read_schedule(plan)
        self._current = plan
        return None if plan.has_logits else _RemoteOutput()

    def pending_logits(self) -> tuple[torch.Tensor, list[str]]:
        """The engine's logits in the shared buffer, ordered after the worker's copy."""
        plan = self._current
        torch.cuda.current_stream().wait_event(self._logits_ready)
        return self._logits[:len(plan.rows)], plan.rows

    def sample_forced(self, token_ids: torch.Tensor) -> _RemoteOutput:
        rows = token_ids.shape[0]
        self._tokens[:rows].copy_(token_ids)
        self._tokens_ready.record()
        self._send(("force", self._current.step, rows))
        return _RemoteOutput()

    def begin_update(self, plan: _RemotePlan, output: Any) -> None:
        """Ask for the step's update now, so the worker runs it while this process works."""
        self._send(("update", plan.step))

    def update(self, plan: _RemotePlan, output: Any) -> StepResult:
        step, request_ids, new_token_ids, finish_reasons = self._reply("updated")
        self._check_step(plan.step, step, "update")
        return StepResult(request_ids, new_token_ids, finish_reasons)

    def abort(self, request_ids: list[str]) -> None:
        self._send(("abort", request_ids))

    def worker_seconds(self) -> dict[str, float]:
        """Host seconds the worker has spent on each kind of message, waiting for messages
        ("receiving") and, within its updates, for the sampled tokens (for profiling, between
        successful calls: a failed call may leave a step's reply unread)."""
        self._send(("stats",))
        return self._reply("stats", timed=False)

    def shutdown(self) -> None:
        """Stop the worker (it frees its engine); kill it if it does not exit."""
        try:
            self._connection.send(("shutdown",))
        except (BrokenPipeError, OSError):
            pass
        if self._reap(STOP_TIMEOUT_S):
            logger.error("%s engine process did not exit in %d s; killed it", self.role,
                         STOP_TIMEOUT_S)
        self._connection.close()

    def _check_step(self, expected: int, replied: int, what: str) -> None:
        """Replies come in request order; a reply for another step means the sides parted."""
        if replied != expected:
            raise LockstepError(f"the {self.role} engine process answered step {replied}'s "
                                f"{what} where step {expected}'s was due")


def _worker_main(connection: Any, role: str, model: str, engine_args: dict[str, Any],
                 overlap_steps: bool) -> None:
    """The worker: build the engine, then serve messages until `shutdown`."""
    try:
        _serve(connection, role, model, engine_args, overlap_steps)
    except BaseException:  # noqa: BLE001 - the main process raises it
        connection.send(("error", traceback.format_exc()))


def _serve(connection: Any, role: str, model: str, engine_args: dict[str, Any],
           overlap_steps: bool) -> None:
    from sampler.vllm_internals import SteppedEngine, build_llm

    engine = SteppedEngine(build_llm(role, model, engine_args, overlap_steps), role)
    connection.send(("ready", {
        "max_num_seqs": engine.max_num_seqs, "max_batched_tokens": engine.max_batched_tokens,
        "block_size": engine.block_size, "num_kv_blocks": engine.num_kv_blocks,
        "logits_width": engine.logits_width, "overlaps_steps": engine.overlaps_steps,
        "max_model_len": engine.max_model_len, "device": str(engine.device)}))
    _, tokens, tokens_ready = connection.recv()
    logits_buffer: torch.Tensor | None = None
    logits_ready = torch.cuda.Event(interprocess=True)
    logits_ready.record()  # an event is shared once it exists
    steps: dict[int, list] = {}
    # Host seconds the worker spent on each kind of message, and waiting for the next one.
    seconds = {"receiving": 0.0}
    while True:
        start = time.perf_counter()
        message = connection.recv()
        handling = time.perf_counter()
        seconds["receiving"] += handling - start
        kind = message[0]
        if kind == "schedule":
            _, step, requests = message
            for request in requests:
                engine.add_request(*request)
            plan = engine.schedule()
            new, cached, preempted = engine.describe(plan)
            output = engine.execute(plan)
            rows, shared = [], None
            if output is None:
                logits, rows = engine.pending_logits()
                if logits_buffer is None or logits_buffer.dtype != logits.dtype:
                    logits_buffer = torch.empty(engine.max_num_seqs, logits.shape[1],
                                                dtype=logits.dtype, device=logits.device)
                    shared = (logits_buffer, logits_ready)
                logits_buffer[:len(rows)].copy_(logits)
                logits_ready.record()
            steps[step] = [plan, output]
            connection.send(("scheduled", (step, new, cached, preempted, rows,
                                           output is None, shared)))
        elif kind == "force":
            _, step, rows = message
            torch.cuda.current_stream().wait_event(tokens_ready)
            steps[step][1] = engine.sample_forced(tokens[:rows])
        elif kind == "update":
            step = message[1]
            plan, output = steps.pop(step)
            result = engine.update(plan, output)
            connection.send(("updated", (step, result.request_ids, result.new_token_ids,
                                         result.finish_reasons)))
        elif kind == "abort":
            engine.abort(message[1])
        elif kind == "stats":
            connection.send(("stats", {**seconds, "waiting_for_sampled_tokens":
                                       engine.wait_seconds}))
        elif kind == "shutdown":
            engine.shutdown()
            return
        seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - handling
