"""Every source format staged through real DuckDB, the GSM8K final-answer filter
(math-verify), and the per-row array checks that the validation suites read."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import DATASETS_DIR, parse_dataset_config
from tasks.publishing import curate
from tasks.staging import TextScreen, normalise_rows, read_source
from tasks.validation import validation_frame

ROWS = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "How many legs has a cat?", "answer": "#### 4"},
        {"question": "", "answer": "#### 0"}]


def config_for(source_yaml: str):
    text = (DATASETS_DIR / "demo.yaml").read_text()
    start = text.index("source:")
    end = text.index("text_columns:")
    return parse_dataset_config(text[:start] + source_yaml + text[end:], "test.yaml")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "duckdb_query"])
def test_every_source_format_stages_the_same_prompts(tmp_path, fmt):
    table = pa.Table.from_pylist(ROWS)
    if fmt == "csv":
        path = tmp_path / "rows.csv"
        duckdb.from_arrow(table).write_csv(str(path))
        source = f"source:\n  format: csv\n  path: {path}\n"
    elif fmt == "parquet":
        path = tmp_path / "rows.parquet"
        pq.write_table(table, path)
        source = f"source:\n  format: parquet\n  path: {path}\n"
    else:
        path = tmp_path / "rows.parquet"
        pq.write_table(table, path)
        source = (f"source:\n  format: duckdb_query\n  query: \"SELECT * FROM "
                  f"read_parquet('{path}') ORDER BY length(question) DESC\"\n"
                  f"  path: {tmp_path}\n")
    config = config_for(source)
    frame, unreadable = read_source(config)
    prompts, rejects = normalise_rows(frame, config, TextScreen({}))
    assert unreadable == []
    assert sorted(p.fields["question"] for p in prompts) == sorted(r["question"] for r in ROWS[:2])
    assert len(rejects) == 1 and "row 3: field 'question' is " in rejects[0]["reason"]
    assert all("Reference solution" in p.teacher_prompt for p in prompts)
    assert all("Reference solution" not in p.theta_prompt for p in prompts)


def generated_rows(completions: list[str], finish_reasons: list[str] | None = None) -> pa.Table:
    """Validated rows as generation writes them, with two tokens each."""
    rows = len(completions)
    return pa.table({
        "prompt_id": [chr(ord("a") + i) for i in range(rows)],
        "theta_prompt": [f"question {i}" for i in range(rows)],
        "theta_prompt_ids": [[7, 8, 9]] * rows, "completion_text": completions,
        "token_ids": [[11, 2]] * rows, "finish_reason": finish_reasons or ["stop"] * rows,
        "log_q": [[-1.0, -0.5]] * rows, "log_theta": [[-1.5, -0.25]] * rows,
    })


def test_gsm8k_answer_check_keeps_only_matching_final_answers():
    """math-verify, not a regex: '$18' and '18.00' are 18; '1,000.' is 1000."""
    config = parse_dataset_config((DATASETS_DIR / "gsm8k.yaml").read_text(), "gsm8k.yaml")
    table = generated_rows(["so the total is #### $18", "#### 1,000.", "no final answer",
                            "#### 18.00", "#### 17"])
    curated = curate(table, config, {"a": "... #### 18", "b": "#### 1000", "c": "#### 3",
                                     "d": "#### 18", "e": "#### 18"}, {"run_id": "r1"})
    assert curated.table["prompt_id"].to_pylist() == ["a", "b", "d"]
    assert curated.table["run_id"].to_pylist() == ["r1"] * 3
    assert (curated.left_out_answer, curated.left_out_truncated) == (2, 0)


def test_validation_frame_flags_bad_arrays_row_by_row():
    """Row 0 is sound; row 1's log q holds +0.5; row 2's alpha list is one token short;
    row 3 has a NaN log θ and no teacher prompt ids; row 4 generated nothing and has no
    theta prompt ids."""
    good = [-0.1, -2.0]
    table = pa.table({
        "prompt_id": ["a", "b", "c", "d", "e"], "sample_index": [0, 0, 0, 0, 0],
        "sample_round": ["first"] * 4 + ["2026-01-02"],
        "completion_text": ["x", "x", "x", "x", ""], "finish_reason": ["stop"] * 4 + ["length"],
        "num_tokens": [2, 2, 2, 2, 0],
        "token_ids": [[1, 2]] * 4 + [[]], "teacher_prompt_ids": [[3]] * 3 + [[], [3]],
        "theta_prompt_ids": [[3]] * 4 + [[]],
        "alpha": [[0.5, 0.6], [0.5, 0.6], [0.5], [0.5, 0.6], []],
        "log_q": [good, [-0.1, 0.5], good, good, []],
        "log_teacher": [good] * 4 + [[]],
        "log_theta": [good, good, good, [-0.1, float("nan")], []],
    })
    frame = validation_frame(table)
    assert frame["arrays_match_num_tokens"].tolist() == [True, True, False, True, True]
    assert frame["logprobs_finite_and_nonpositive"].tolist() == [True, False, True, False, True]
    assert frame["has_prompt_ids"].tolist() == [True] * 3 + [False, False]
    assert frame["row_key"].tolist() == ["a#first#0", "b#first#0", "c#first#0", "d#first#0",
                                         "e#2026-01-02#0"]
    assert not {"alpha", "token_ids", "teacher_prompt_ids", "theta_prompt_ids"} & set(
        frame.columns)


def test_the_schema_runs_once_per_version_of_it(tmp_path):
    """A catalog whose schema version matches is left alone; an older one is brought up."""
    from tasks.sql import connect, schema_hash

    path = tmp_path / "catalog.duckdb"
    connect(path).close()

    def shard_columns() -> set[str]:
        connection = duckdb.connect(str(path))
        try:
            return {row[0] for row in connection.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'shards'").fetchall()}
        finally:
            connection.close()

    def alter(statement: str) -> None:
        connection = duckdb.connect(str(path))
        connection.execute(statement)
        connection.close()

    assert "sample_round" in shard_columns()
    alter("ALTER TABLE shards DROP COLUMN sample_round")
    connect(path).close()
    assert "sample_round" not in shard_columns()          # same version: schema.sql skipped
    alter("UPDATE schema_version SET schema_hash = 'older'")
    connection = connect(path)
    assert connection.execute("SELECT * FROM schema_version").fetchall() == [(schema_hash(),)]
    connection.close()
    assert "sample_round" in shard_columns()              # older version: brought up to date
    alter("DROP TABLE schema_version")                     # a catalog made before versions
    alter("ALTER TABLE shards DROP COLUMN sample_round")
    connect(path).close()
    assert "sample_round" in shard_columns()
