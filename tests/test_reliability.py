"""Faults, bad input and concurrent runs: nothing is lost, duplicated or half-visible.

Crashes are real: the flow runs in its own process, which a named crash point
(`DISTILL_CRASH_AT`, see tasks/faults.py) kills with SIGKILL at the worst moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.distill import RunFailed, distill
from sampler.errors import ConfigError
from tasks.config import DATASETS_DIR, REPO_ROOT
from tasks.locking import RunLocked, run_lock

RUN_DATE = date(2026, 2, 1)


class FlowProcess:
    """The flow as its own OS process group (it starts its own ephemeral Prefect server)."""

    def __init__(self, data_dir: Path, tiny_pair, crash_at: str | None, lock_wait: float):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.pop("DISTILL_CRASH_AT", None)
        env.update(DISTILL_TINY_MODELS_DIR=str(Path(tiny_pair[0]).parent), PYTHONUNBUFFERED="1")
        if crash_at:
            env["DISTILL_CRASH_AT"] = crash_at
        self.log = data_dir.parent / f"{data_dir.name}-{os.urandom(4).hex()}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "flows.distill", "--dataset", "demo", "--run-date",
                   RUN_DATE.isoformat(), "--shard-size", "4", "--data-dir", str(data_dir),
                   "--lock-wait-seconds", str(lock_wait)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait for the flow process, then end whatever it left running (its server)."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code, self.log.read_text()


def flow_process(data_dir: Path, tiny_pair, crash_at: str | None = None,
                 lock_wait: float = 0.0) -> tuple[int, str]:
    return FlowProcess(data_dir, tiny_pair, crash_at, lock_wait).finish()


def partition(data_dir: Path) -> Path:
    return data_dir / "published" / "dataset=demo" / f"run_date={RUN_DATE}" / "data.parquet"


def visible_parquet(data_dir: Path) -> list[Path]:
    """What a reader globbing the published folder (as the SQL view does) would open."""
    return sorted((data_dir / "published").glob("*/*/*.parquet"))


def assert_each_prompt_once(data_dir: Path, expected: int = 12) -> None:
    table = pq.read_table(partition(data_dir))
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))
    assert len(keys) == expected and len(set(keys)) == expected


def test_crash_while_writing_a_shard_loses_and_duplicates_nothing(tmp_path, tiny_pair):
    code, output = flow_process(tmp_path, tiny_pair, crash_at="shard-write:2")
    assert code == -9, output[-2000:]
    finished = list((tmp_path / "shards" / "demo").glob("*.parquet"))
    leftovers = list((tmp_path / "shards" / "demo").glob(".*.tmp"))
    assert len(finished) == 1 and len(leftovers) == 1
    assert visible_parquet(tmp_path) == []
    code, output = flow_process(tmp_path, tiny_pair)
    assert code == 0, output[-3000:]
    assert_each_prompt_once(tmp_path)
    assert list((tmp_path / "shards" / "demo").glob(".*.tmp")) == []
    connection = duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True)
    statuses = connection.execute("SELECT status FROM runs ORDER BY started_at").fetchall()
    reused = connection.execute("SELECT count(*) FROM shards WHERE status = 'reused'").fetchone()
    views = connection.execute("SELECT count(*), count(DISTINCT prompt_id) FROM published"
                               ).fetchone()
    connection.close()
    assert statuses == [("crashed",), ("published",)]
    assert reused == (1,)
    assert views == (12, 12)


def test_crash_while_publishing_leaves_the_old_partition_whole(tmp_path, tiny_pair):
    code, output = flow_process(tmp_path, tiny_pair)
    assert code == 0, output[-3000:]
    old = partition(tmp_path).read_bytes()
    old_run = set(pq.read_table(partition(tmp_path))["run_id"].to_pylist())
    code, output = flow_process(tmp_path, tiny_pair, crash_at="publish")
    assert code == -9, output[-2000:]
    assert partition(tmp_path).read_bytes() == old
    assert visible_parquet(tmp_path) == [partition(tmp_path)]
    connection = duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True)
    seen = connection.execute("SELECT DISTINCT run_id FROM published").fetchall()
    connection.close()
    assert {run for (run,) in seen} == old_run
    code, output = flow_process(tmp_path, tiny_pair)
    assert code == 0, output[-3000:]
    new_runs = set(pq.read_table(partition(tmp_path))["run_id"].to_pylist())
    assert len(new_runs) == 1 and new_runs != old_run
    assert_each_prompt_once(tmp_path)
    assert not list(partition(tmp_path).parent.glob(".*.tmp"))


def test_a_second_run_of_the_same_dataset_and_date_is_refused_or_waits(tmp_path, tiny_pair):
    with run_lock(tmp_path, "demo", RUN_DATE):
        code, output = flow_process(tmp_path, tiny_pair)
        assert code != 0
        assert "another run of demo for 2026-02-01 is in progress" in output
        waiting = FlowProcess(tmp_path, tiny_pair, None, lock_wait=300)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.process.wait(timeout=20)
    code, output = waiting.finish()
    assert code == 0, output[-3000:]
    code, output = flow_process(tmp_path, tiny_pair)
    assert code == 0, output[-3000:]
    assert_each_prompt_once(tmp_path)
    with pytest.raises(RunLocked):
        with run_lock(tmp_path, "demo", RUN_DATE):
            with run_lock(tmp_path, "demo", RUN_DATE):
                pass


@pytest.fixture(scope="module")
def harness(tiny_pair):
    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_config(tmp_path: Path, name: str, **replacements: str) -> Path:
    text = (DATASETS_DIR / "demo.yaml").read_text().replace("name: demo", f"name: {name}")
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_ten_kinds_of_bad_rows_are_rejected_by_row_and_the_good_rows_published(
        harness, tmp_path):
    lines = [
        json.dumps({"id": "good-1", "question": "What is 2 + 3?", "answer": "#### 5"}),
        json.dumps({"id": "empty", "question": "   ", "answer": "#### 1"}),
        json.dumps({"id": "null", "question": None, "answer": "#### 1"}),
        json.dumps({"id": "no-question", "answer": "#### 1"}),
        json.dumps({"id": "huge", "question": "x" * 60_000, "answer": "#### 1"}),
        json.dumps({"id": "long-in-tokens", "question": "seven " * 1200, "answer": "#### 7"}),
        json.dumps({"id": "good-1", "question": "A different question?", "answer": "#### 2"}),
        json.dumps({"id": "bad-utf8", "question": "caf", "answer": "#### 1"}).replace(
            "caf", "caf\udcff"),
        '{"id": "broken", "question": "unterminated',
        json.dumps({"id": None, "question": "Who am I?", "answer": "#### 0"}),
        json.dumps({"id": "good-2", "question": "How many legs has a cat?", "answer": "#### 4"}),
    ]
    source = tmp_path / "bad.jsonl"
    source.write_bytes("\n".join(lines).encode("utf-8", errors="surrogateescape") + b"\n")
    config = write_config(tmp_path, "bad_rows", **{
        "path: data/gsm8k/test.jsonl": f"path: {source}", "limit: 12": "limit: 100",
        "max_prompt_chars: 2000": "max_prompt_chars: 50000",
        "text_columns: [question, answer]": "id_column: id\ntext_columns: [question, answer]"})
    summary = distill(dataset=str(config), run_date=RUN_DATE, shard_size=4,
                      data_dir=str(tmp_path / "data"))
    assert summary["rows_published"] == 2
    connection = duckdb.connect(str(tmp_path / "data" / "catalog.duckdb"), read_only=True)
    reasons = connection.execute("SELECT stage, coalesce(CAST(source_row AS VARCHAR), prompt_id),"
                                 " reason FROM rejected_rows").fetchall()
    connection.close()
    by_row = {row: (stage, reason) for stage, row, reason in reasons}
    expected = {"2": "field 'question' is empty", "3": "field 'question' is missing",
                "4": "field 'question' is missing", "5": "max_prompt_chars",
                "7": "duplicate id 'good-1' with different content",
                "8": "invalid UTF-8", "9": "not valid JSON", "10": "id column 'id' is NULL"}
    for row, text in expected.items():
        assert text in by_row[row][1] and by_row[row][1].startswith(f"row {row}:"), by_row
    generation = [reason for stage, _, reason in reasons if stage == "generate"]
    assert len(generation) == 1
    assert "prompt long-in-tokens (source row 6)" in generation[0]
    assert "context" in generation[0]


@pytest.mark.parametrize("replacements,field", [
    ({"alpha_method: kl_symmetry": "alpha_method: magic"}, "alpha_method"),
    ({"alpha_min: 0.5": "alpha_min: 0.9", "alpha_max: 1.0": "alpha_max: 0.6"}, "alpha_min"),
    ({"path: data/gsm8k/test.jsonl": "path: /no/such/file.jsonl"}, "source.path"),
    ({"text_columns: [question, answer]": "text_columns: [question, answer, hint]",
      '"{question}"': '"{question} {hint}"'}, "hint"),
    ({"teacher: tiny:teacher": "teacher: /no/such/model"}, "models.teacher"),
    ({"max_tokens: 48": "max_tokens: -3"}, "sampling.max_tokens"),
])
def test_bad_configs_fail_before_any_work_naming_the_field(harness, tmp_path, replacements,
                                                           field):
    config = write_config(tmp_path, "bad_config", **replacements)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        distill(dataset=str(config), run_date=RUN_DATE, data_dir=str(tmp_path / "data"))
    assert not (tmp_path / "data" / "shards").exists()


def test_models_with_different_tokenizers_fail_the_run_with_the_reason(harness, tmp_path,
                                                                       tiny_pair, gsm8k_rows):
    from sampler.tiny_models import train_tokenizer

    other = tmp_path / "other-theta"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((Path(tiny_pair[1]) / name).read_bytes())
    train_tokenizer([r["question"] for r in gsm8k_rows[:300]], 400, other)
    config = write_config(tmp_path, "mismatched", **{"theta: tiny:theta": f"theta: {other}"})
    with pytest.raises(RunFailed, match="tokenizers differ"):
        distill(dataset=str(config), run_date=RUN_DATE, data_dir=str(tmp_path / "data"))


def test_all_or_nothing_gate_keeps_the_partition_unpublished(harness, tmp_path):
    config = write_config(tmp_path, "gated",
                          **{"min_rows: 1": "min_rows: 1\n  all_or_nothing: true"})
    data_dir = tmp_path / "data"
    first = distill(dataset=str(config), run_date=RUN_DATE, shard_size=4, data_dir=str(data_dir))
    victim = sorted((data_dir / "shards" / "gated").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    column = table.column_names.index("alpha_min")
    pq.write_table(table.set_column(column, "alpha_min", [[0.1] * table.num_rows]), victim)
    with pytest.raises(RunFailed, match=r"alpha_min") as failure:
        distill(dataset=str(config), run_date=date(2026, 2, 2), shard_size=4,
                data_dir=str(data_dir))
    assert "nothing published" in str(failure.value)
    assert first["rows_published"] == 12
    assert not (data_dir / "published" / "dataset=gated" / "run_date=2026-02-02").exists()
