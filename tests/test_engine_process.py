"""Engines in processes of their own (CUDA only: they share logits by CUDA IPC).

Moving theta's engine, or both, to a worker must change where their host work runs and
nothing else: the same tokens, α and log-probs as both engines in one process. A worker
that dies or stops answering fails the call with `LockstepError` (the sampler then reports
itself unhealthy) instead of hanging it.
Run on the GPU machine with `python3 -m pytest --noconftest tests/test_engine_process.py`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="an engine process needs CUDA")

from sampler import OptimalSamplingV1  # noqa: E402
from sampler.errors import LockstepError  # noqa: E402
from sampler.tiny_models import tiny_pair_paths  # noqa: E402

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test.jsonl"
ENGINE_ARGS = {"max_model_len": 512, "max_num_seqs": 16, "dtype": "bfloat16",
               "enforce_eager": True, "gpu_memory_utilization": 0.2}


def problems(count: int) -> list[str]:
    with GSM8K.open() as handle:
        return [json.loads(next(handle))["question"] for _ in range(count)]


def build(theta_process: bool | None, teacher_process: bool) -> OptimalSamplingV1:
    return OptimalSamplingV1(*map(str, tiny_pair_paths()), theta_process=theta_process,
                             teacher_process=teacher_process, alpha_min=0.0, alpha_max=1.0,
                             **ENGINE_ARGS)


def test_engines_in_processes_of_their_own_give_the_in_process_tokens_and_records():
    prompts = problems(12)
    outputs = {}
    for placement in ((False, False), (True, False), (True, True)):
        sampler = build(*placement)
        try:
            outputs[placement] = sampler.generate(prompts, max_tokens=64, seed=3)
        finally:
            sampler.cleanup()
    alone = outputs.pop((False, False))
    alphas = np.concatenate([np.asarray(a) for a in alone.alpha_history])
    assert 0.0 < np.median(alphas) < 1.0, "a trained pair mixes at interior α"
    for placement, remote in outputs.items():
        for row in range(len(prompts)):
            assert alone.errors[row] is None and remote.errors[row] is None
            assert remote.generated_ids[row] == alone.generated_ids[row], f"{placement} {row}"
            for name in ("alpha_history", "teacher_logprobs", "theta_logprobs",
                         "mixed_logprobs"):
                assert np.array_equal(getattr(remote, name)[row], getattr(alone, name)[row]), \
                    f"{placement} row {row}: {name}"


@pytest.mark.parametrize(("role", "failure"), [("teacher", "dies"), ("theta", "hangs")])
def test_an_engine_process_that_dies_or_hangs_fails_the_call(monkeypatch, role, failure):
    import sampler.engine_process as engine_process

    monkeypatch.setattr(engine_process, "REPLY_TIMEOUT_S", 10)
    sampler = build(None, teacher_process=True)
    try:
        assert sampler.pair.theta.remote, "on CUDA the default runs theta in its own process"
        assert sampler.pair.teacher.remote
        assert sampler.generate(problems(2), max_tokens=8, seed=0).errors == [None, None]
        worker = getattr(sampler.pair, role)._process
        os.kill(worker.pid, signal.SIGKILL if failure == "dies" else signal.SIGSTOP)
        expected = "exited" if failure == "dies" else "did not answer for 10 s"
        with pytest.raises(LockstepError, match=expected):
            sampler.generate(problems(2), max_tokens=8, seed=0)
        assert not sampler.healthy
        worker.join(30)
        assert not worker.is_alive()
    finally:
        sampler.cleanup()
