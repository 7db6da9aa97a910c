"""Nightly runs over a growing source, under Prefect's test harness with real engines: each
sample is published once, a rerun of a date changes nothing, rejects are recorded once, and
a config change makes a new generation in new partitions.

The source starts with 6 good and 2 bad rows; before the 2nd date 3 rows are appended and
one is edited, before the 3rd 2 more are appended. With `samples_per_run: 1` every date also
adds one fresh sample of every prompt it knows.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.distill import distill
from tasks.config import DATASETS_DIR
from tasks.sql import read_catalog

logger = logging.getLogger(__name__)

DATES = [date(2026, 4, 1), date(2026, 4, 2), date(2026, 4, 3)]
SHARD_SIZE = 8


def sql(data_dir: Path, text: str) -> list[tuple]:
    return read_catalog(data_dir / "catalog.duckdb", text)


def write_config(path: Path, source: Path, samples_per_run: int = 1,
                 **replacements: str) -> Path:
    """The demo config over `source` (ids in column `id`), 16 tokens a sample, kept though
    most stop at max_tokens."""
    replacements = {"name: demo": "name: nightly", "path: data/gsm8k/test.jsonl":
                    f"path: {source}", "  limit: 12\n": "",
                    "text_columns: [question, answer]": "id_column: id\n"
                                                        "text_columns: [question, answer]",
                    "max_tokens: 256": "max_tokens: 16",
                    "keep_truncated: false": "keep_truncated: true",
                    "samples_per_prompt: 1": "samples_per_prompt: 1\n"
                                             f"  samples_per_run: {samples_per_run}",
                    **replacements}
    text = (DATASETS_DIR / "demo.yaml").read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def append(source: Path, rows: list[dict]) -> None:
    with source.open("a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


@dataclass
class Nightly:
    data_dir: Path
    config: Path
    source: Path
    summaries: list[dict]

    def run(self, run_date: date, config: Path | None = None) -> dict:
        return distill(dataset=str(config or self.config), run_date=run_date,
                       shard_size=SHARD_SIZE, data_dir=str(self.data_dir))


@pytest.fixture(scope="module")
def nightly(tiny_pair, gsm8k_rows, tmp_path_factory) -> Nightly:
    """Three dates in a row, the source growing between them."""
    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    root = tmp_path_factory.mktemp("nightly")
    good = [{"id": f"q{i}", "question": r["question"], "answer": r["answer"]}
            for i, r in enumerate(gsm8k_rows[:11])]
    source = root / "source.jsonl"
    append(source, good[:6] + [{"id": "empty", "question": " ", "answer": "#### 1"},
                               {"id": "no-answer", "question": "What is 1 + 1?"}])
    config = write_config(root / "nightly.yaml", source)
    with prefect_test_harness(server_startup_timeout=120):
        state = Nightly(root / "data", config, source, [])
        state.summaries.append(state.run(DATES[0]))
        lines = source.read_text().splitlines()
        lines[0] = json.dumps({**good[0], "question": good[0]["question"] + " Answer in cents."})
        source.write_text("\n".join(lines) + "\n")
        append(source, good[6:9])
        state.summaries.append(state.run(DATES[1]))
        append(source, good[9:11])
        state.summaries.append(state.run(DATES[2]))
        yield state


def test_three_dates_publish_each_sample_once(nightly):
    new = [s["new_prompts"] for s in nightly.summaries]
    rows = [s["rows_published"] for s in nightly.summaries]
    logger.info("new prompts per date %s, rows per date %s", new, rows)
    assert new == [6, 4, 2] and rows == [6 + 6, 4 + 9, 2 + 11]
    by_round = sql(nightly.data_dir, """
        SELECT CAST(run_date AS VARCHAR), sample_round = 'first', count(*),
               count(DISTINCT prompt_id)
        FROM published GROUP BY ALL ORDER BY 1, 2""")
    logger.info("published by date and round: %s", by_round)
    assert by_round == [(str(DATES[0]), False, 6, 6), (str(DATES[0]), True, 6, 6),
                        (str(DATES[1]), False, 9, 9), (str(DATES[1]), True, 4, 4),
                        (str(DATES[2]), False, 11, 11), (str(DATES[2]), True, 2, 2)]
    totals = sql(nightly.data_dir, """
        SELECT count(*), count(DISTINCT (prompt_id, content_hash, sample_round, sample_index)),
               count(DISTINCT (prompt_id, content_hash)) FILTER (sample_round = 'first')
        FROM published""")
    assert totals == [(38, 38, 12)]
    rounds = sql(nightly.data_dir, "SELECT DISTINCT sample_round = CAST(run_date AS VARCHAR), "
                                   "sample_round = 'first' FROM published ORDER BY 2")
    assert rounds == [(True, False), (False, True)]
    seeds = sql(nightly.data_dir, "SELECT count(DISTINCT seed) FROM published "
                                  "WHERE prompt_id = 'q1' AND sample_round <> 'first'")
    assert seeds == [(3,)]
    edited = sql(nightly.data_dir, "SELECT CAST(run_date AS VARCHAR) FROM published "
                                   "WHERE prompt_id = 'q0' AND sample_round = 'first' ORDER BY 1")
    assert edited == [(str(DATES[0]),), (str(DATES[1]),)]


def test_a_rerun_of_a_date_changes_nothing(nightly):
    """The 2nd date again, after the 3rd: prompts added since stay with the 3rd."""
    partitions = sorted((nightly.data_dir / "published").glob("*/*/*/*.parquet"))
    before = {path: path.read_bytes() for path in partitions}
    before_rows = pq.read_table(nightly.summaries[1]["partition"])
    shards = sorted((nightly.data_dir / "shards").rglob("*.parquet"))
    again = nightly.run(DATES[1])
    logger.info("rerun of %s: %d shards, %d reused, %d rows", DATES[1], again["shards_ok"],
                again["shards_reused"], again["rows_published"])
    assert again["shards_reused"] == again["shards_ok"] == 3
    assert (again["new_prompts"], again["rows_published"]) == (4, 13)
    assert sorted((nightly.data_dir / "shards").rglob("*.parquet")) == shards
    assert sorted((nightly.data_dir / "published").glob("*/*/*/*.parquet")) == partitions
    rerun = Path(again["partition"])
    publisher = ["published_run_id", "published_at"]
    assert rerun == Path(nightly.summaries[1]["partition"])
    after_rows = pq.read_table(rerun)
    assert after_rows.drop_columns(publisher).equals(before_rows.drop_columns(publisher))
    assert all(path.read_bytes() == content for path, content in before.items() if path != rerun)
    assert sql(nightly.data_dir, "SELECT count(*) FROM published") == [(38,)]


def test_rejected_rows_are_recorded_once(nightly):
    rejects = sql(nightly.data_dir, "SELECT source_row, first_run_id, last_run_id "
                                    "FROM rejected_rows ORDER BY source_row")
    runs = sql(nightly.data_dir, "SELECT run_id FROM runs ORDER BY started_at")
    logger.info("%d runs, rejected_rows holds %s", len(runs), rejects)
    assert len(runs) >= 3
    assert rejects == [(7, runs[0][0], runs[-1][0]), (8, runs[0][0], runs[-1][0])]


def test_a_config_change_makes_a_new_generation(nightly, tmp_path):
    """A new teacher system prompt: every prompt's first samples again, in new partitions;
    the old generation's partitions stay as they were."""
    old = sorted((nightly.data_dir / "published").glob("*/*/*/*.parquet"))
    before = {path: path.read_bytes() for path in old}
    changed = write_config(tmp_path / "nightly.yaml", nightly.source, samples_per_run=0, **{
        "teacher_system: You are a careful math teacher.": "teacher_system: Be brief."})
    summary = nightly.run(date(2026, 4, 4), changed)
    logger.info("new generation %s: %d new prompts, %d rows", summary["generation"],
                summary["new_prompts"], summary["rows_published"])
    assert summary["generation"] != nightly.summaries[0]["generation"]
    assert (summary["new_prompts"], summary["rows_published"]) == (11, 11)
    assert f"generation={summary['generation']}" in summary["partition"]
    assert all(path.read_bytes() == content for path, content in before.items())
    latest = sql(nightly.data_dir, "SELECT generation, count(*), count(DISTINCT prompt_id) "
                                   "FROM latest_generation GROUP BY ALL")
    assert latest == [(summary["generation"], 11, 11)]
    systems = sql(nightly.data_dir, "SELECT settings->>'$.prompts.teacher_system' "
                                    "FROM generations ORDER BY created_at")
    assert [s for (s,) in systems][1].startswith("Be brief.")
    assert sql(nightly.data_dir, "SELECT count(*) FROM published") == [(38 + 11,)]
