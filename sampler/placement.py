"""Where an engine of the pair runs, behind the one interface the lockstep steps.

As vLLM runs a model in this process, in worker processes or on Ray behind one `Executor`
interface, an engine of the pair has three placements, each implementing `Engine`:

- in this process (`SteppedEngine`, the default);
- in its own process (`sampler.engine_process.RemoteEngine`; CUDA with overlapped steps):
  its scheduling and bookkeeping run beside this process's work;
- on tensor-parallel workers (`TensorParallelEngine`): `tensor_parallel_size` above 1, or
  `distributed_executor_backend="mp"` at any size; the scheduler stays here, the model runs
  on vLLM's multiprocess executor. Serial steps only.

The lockstep never asks which placement it has: it calls every engine in the same order.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from sampler.errors import ConfigError
from sampler.vllm_internals import (StepResult, SteppedEngine, TensorParallelEngine,
                                    build_llm, build_tensor_parallel_llm)


class Engine(Protocol):
    """What the lockstep calls, per step: `schedule` (returns a plan at once; a placement
    schedules when the plan is first described or executed, or in its own process),
    `begin_update` of the step before (overlapped steps), `describe` and `execute` of the
    plan, `pending_logits`, `sample_forced` with the drawn tokens, then `update`."""

    role: str
    #: Whether its scheduler runs in another process (for reports; the lockstep never asks).
    remote: bool
    max_model_len: int
    max_num_seqs: int
    max_batched_tokens: int
    block_size: int
    num_kv_blocks: int
    logits_width: int
    #: Where `pending_logits` puts the logits (the mixing runs there).
    device: torch.device
    overlaps_steps: bool
    #: Host seconds spent waiting for the engine's results.
    wait_seconds: float

    def add_request(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                    stop_token_ids: list[int]) -> None: ...

    def schedule(self) -> Any: ...

    def describe(self, plan: Any) -> tuple[dict[str, int], dict[str, int], set[str]]: ...

    def execute(self, plan: Any) -> Any: ...

    def pending_logits(self) -> tuple[torch.Tensor, list[str]]: ...

    def sample_forced(self, token_ids: torch.Tensor) -> Any: ...

    def begin_update(self, plan: Any, output: Any) -> None: ...

    def update(self, plan: Any, output: Any) -> StepResult: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def shutdown(self) -> None: ...


def on_tensor_parallel_workers(role: str, engine_args: dict[str, Any]) -> bool:
    """Whether the engine's settings place it on tensor-parallel workers; `ConfigError`
    naming the setting for one the lockstep cannot run."""
    stages = engine_args.get("pipeline_parallel_size") or 1
    if int(stages) > 1:
        raise ConfigError(
            f"{role}_engine_args.pipeline_parallel_size: {stages}: pipeline parallel is not "
            "supported (the CPU build cannot run it, so it is untested); split the model "
            "with tensor_parallel_size instead")
    ranks = int(engine_args.get("tensor_parallel_size") or 1)
    backend = engine_args.get("distributed_executor_backend")
    on_workers = ranks > 1 or backend == "mp"
    if on_workers and backend not in (None, "mp"):
        raise ConfigError(
            f"{role}_engine_args.distributed_executor_backend: {backend!r}: a tensor-parallel "
            "engine runs on vLLM's multiprocess executor (\"mp\") only; Ray runs a step as one "
            "call per worker, leaving the lockstep no point to mix at")
    return on_workers


def place_engine(role: str, model: str, engine_args: dict[str, Any], own_process: bool,
                 overlap_steps: bool) -> Engine:
    """Build the engine where its settings (`on_tensor_parallel_workers`) and
    `own_process` place it."""
    if on_tensor_parallel_workers(role, engine_args):
        if own_process:
            raise ConfigError(f"{role}_process: an engine on tensor-parallel workers cannot "
                              "also run in an engine process; leave it off")
        return TensorParallelEngine(build_tensor_parallel_llm(role, model, engine_args), role)
    if own_process:
        from sampler.engine_process import RemoteEngine

        return RemoteEngine(role, model, engine_args, overlap_steps)
    return SteppedEngine(build_llm(role, model, engine_args, overlap_steps), role)
