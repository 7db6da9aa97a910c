"""Faults, bad input and concurrent runs: nothing is lost, duplicated or half-visible.

Crashes are real: the flow runs in its own process, which a named crash point
(`DISTILL_CRASH_AT`, see tasks/faults.py) kills with SIGKILL at the worst moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.distill import RunFailed, distill
from sampler.errors import ConfigError
from tasks.config import DATASETS_DIR, REPO_ROOT
from tasks.locking import RunLocked, lock_path, run_lock
from tasks.sql import read_catalog

logger = logging.getLogger(__name__)

RUN_DATE = date(2026, 2, 1)
NEXT_DATE = date(2026, 2, 2)
#: 32-token samples, kept though most stop at max_tokens: these tests are about faults.
SHORT = {"max_tokens: 256": "max_tokens: 32", "keep_truncated: false": "keep_truncated: true"}


@pytest.fixture(scope="module")
def harness(tiny_pair) -> str:
    """Prefect's test server; flow processes report to it too. Yields its API URL."""
    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    """The demo dataset's config with 32-token samples: these tests are about faults."""
    return str(write_config(tmp_path_factory.mktemp("config"), "demo", **SHORT))


class FlowProcess:
    """The flow as its own OS process group, reporting to the test's Prefect server."""

    def __init__(self, data_dir: Path, api_url: str, dataset: str, crash_at: str | None = None,
                 lock_wait: float = 0.0, run_date: date = RUN_DATE):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.pop("DISTILL_CRASH_AT", None)
        env.update(PREFECT_API_URL=api_url, PYTHONUNBUFFERED="1")
        if crash_at:
            env["DISTILL_CRASH_AT"] = crash_at
        self.log = data_dir.parent / f"{data_dir.name}-{os.urandom(4).hex()}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "flows.distill", "--dataset", dataset, "--run-date",
                   run_date.isoformat(), "--shard-size", "4", "--data-dir", str(data_dir),
                   "--lock-wait-seconds", str(lock_wait)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait for the flow process, then end whatever it left running."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.kill()
        return code, self.log.read_text()

    def kill(self) -> None:
        """End the process group, whatever it is doing (stopped included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@contextlib.contextmanager
def killed_on_failure(*flows: FlowProcess) -> Iterator[None]:
    """Kill the flow processes if the block fails, so none outlives the test."""
    try:
        yield
    except BaseException:
        for flow in flows:
            flow.kill()
        raise


def flow_process(data_dir: Path, api_url: str, dataset: str, **options) -> tuple[int, str]:
    return FlowProcess(data_dir, api_url, dataset, **options).finish()


def in_process(data_dir: Path, dataset: str, run_date: date = RUN_DATE) -> dict:
    """A run that is not the one crashing, in the test's process (no start-up cost)."""
    return distill(dataset=dataset, run_date=run_date, shard_size=4, data_dir=str(data_dir))


def catalog(data_dir: Path, text: str) -> list[tuple]:
    return read_catalog(data_dir / "catalog.duckdb", text)


def visible_parquet(data_dir: Path) -> list[Path]:
    """What a reader globbing the published folder (as the SQL view does) would open."""
    return sorted((data_dir / "published").glob("*/*/*/*.parquet"))


def partition(data_dir: Path, dataset: str = "demo", run_date: date = RUN_DATE) -> Path:
    """The one partition of this dataset and date (these tests make one generation)."""
    found = [p for p in visible_parquet(data_dir)
             if p.parts[-4] == f"dataset={dataset}" and p.parts[-2] == f"run_date={run_date}"]
    assert len(found) == 1, found
    return found[0]


def assert_each_prompt_once(data_dir: Path, expected: int = 12,
                            run_date: date = RUN_DATE) -> None:
    table = pq.read_table(partition(data_dir, run_date=run_date))
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))
    assert len(keys) == expected and len(set(keys)) == expected


def temporary_shard(path: Path) -> tuple[str, int]:
    """The shard key and writer pid in a temporary file's name (tasks/atomic_files.py)."""
    target, _host, pid, _thread, _ = path.name.rsplit(".", 4)
    return target.removeprefix(".").removesuffix(".parquet"), int(pid)


def test_a_date_killed_while_writing_a_shard_leaves_its_prompts_to_the_next(harness, demo,
                                                                           tmp_path):
    """SIGKILL as the last of the 3 shards reaches its rename: each shard is then a finished
    file or a whole hidden temporary file (how many of each depends on the threads' timing,
    so the test reads it off the folder). The next date takes over the dead run's prompts,
    reusing its finished shards and regenerating the others, marks it crashed, and its rerun
    finds nothing left."""
    flow = FlowProcess(tmp_path, harness, demo, crash_at="shard-write:3")
    code, output = flow.finish()
    assert code == -9, output[-2000:]
    folder = tmp_path / "shards" / "demo"
    finished = {path.name.removesuffix(".parquet") for path in folder.glob("*.parquet")}
    temporaries = sorted(folder.glob(".*.tmp"))
    unrenamed = {temporary_shard(path)[0] for path in temporaries}
    logger.info("killed with %d shards renamed and %d not", len(finished), len(unrenamed))
    assert len(finished | unrenamed) == len(finished) + len(temporaries) == 3, (finished,
                                                                                temporaries)
    assert unrenamed, "the killed writer's temporary file is missing"
    for path in temporaries:
        assert temporary_shard(path)[1] == flow.process.pid, path
        assert pq.read_table(path).num_rows == 4, path
    assert visible_parquet(tmp_path) == []
    assert in_process(tmp_path, demo, NEXT_DATE)["rows_published"] == 12
    assert_each_prompt_once(tmp_path, run_date=NEXT_DATE)
    assert list(folder.glob(".*.tmp")) == []
    assert catalog(tmp_path, f"SELECT status FROM runs WHERE run_date = DATE '{RUN_DATE}'"
                   ) == [("crashed",)]
    assert in_process(tmp_path, demo)["status"] == "up_to_date"
    runs = catalog(tmp_path, "SELECT run_id, CAST(run_date AS VARCHAR), status, rows_published "
                             "FROM runs ORDER BY started_at")
    shards = catalog(tmp_path, "SELECT run_id, shard_key, status FROM shards")
    logger.info("runs (id, date, status, rows): %s; shards: %s", runs, shards)
    assert [r[1:] for r in runs] == [(str(RUN_DATE), "crashed", None),
                                     (str(NEXT_DATE), "published", 12),
                                     (str(RUN_DATE), "up_to_date", 0)]
    dead, taker = runs[0][0], runs[1][0]
    assert {key: (run, status) for run, key, status in shards} == {
        **{key: (taker, "reused") for key in finished},
        **{key: (taker, "generated") for key in unrenamed}} and len(shards) == 3
    by_generator = dict(catalog(tmp_path, "SELECT generated_run_id, count(*) FROM published "
                                          "GROUP BY ALL"))
    expected = {dead: 4 * len(finished), taker: 4 * len(unrenamed)}
    assert by_generator == {run: rows for run, rows in expected.items() if rows}
    assert catalog(tmp_path, "SELECT count(*), count(DISTINCT prompt_id) FROM published"
                   ) == [(12, 12)]


def test_crash_while_publishing_leaves_the_old_partition_whole(harness, demo, tmp_path):
    in_process(tmp_path, demo)
    old = partition(tmp_path).read_bytes()
    old_run = set(pq.read_table(partition(tmp_path))["published_run_id"].to_pylist())
    code, output = flow_process(tmp_path, harness, demo, crash_at="publish")
    assert code == -9, output[-2000:]
    assert partition(tmp_path).read_bytes() == old
    assert visible_parquet(tmp_path) == [partition(tmp_path)]
    seen = catalog(tmp_path, "SELECT DISTINCT published_run_id FROM published")
    assert {run for (run,) in seen} == old_run
    in_process(tmp_path, demo)
    new_runs = set(pq.read_table(partition(tmp_path))["published_run_id"].to_pylist())
    assert len(new_runs) == 1 and new_runs != old_run
    assert_each_prompt_once(tmp_path)
    assert not list(partition(tmp_path).parent.glob(".*.tmp"))


def test_a_second_run_of_the_same_dataset_and_date_is_refused_or_waits(harness, demo,
                                                                       tmp_path):
    with run_lock(tmp_path, "demo", RUN_DATE):
        with pytest.raises(RunLocked, match="another run of demo for 2026-02-01 is in progress"):
            in_process(tmp_path, demo)
        waiting = FlowProcess(tmp_path, harness, demo, lock_wait=300)
        with killed_on_failure(waiting):
            wait_until_trying_the_lock(waiting, lock_path(tmp_path.resolve(), "demo", RUN_DATE))
            with pytest.raises(subprocess.TimeoutExpired):   # refused after 1 s without the wait
                waiting.process.wait(timeout=20)
    code, output = waiting.finish()
    assert code == 0, output[-3000:]
    assert in_process(tmp_path, demo)["shards_reused"] == 3
    assert_each_prompt_once(tmp_path)
    with pytest.raises(RunLocked):
        with run_lock(tmp_path, "demo", RUN_DATE):
            with run_lock(tmp_path, "demo", RUN_DATE):
                pass


def wait_until_trying_the_lock(flow: FlowProcess, lock: Path, timeout: float = 300) -> None:
    """Until the flow process has the lock file open (it then tries the lock every 0.2 s):
    its start-up takes anything from seconds to minutes on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not opened_by(flow.process.pid, lock):
        assert flow.process.poll() is None, flow.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the flow did not reach the lock in {timeout} s"
        time.sleep(0.5)


def opened_by(pid: int, path: Path) -> bool:
    descriptors = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(descriptor) for descriptor in descriptors.iterdir()]
    except FileNotFoundError:       # a descriptor closed while listed: look again
        return False
    return str(path) in links


def test_two_dates_of_one_dataset_at_once_lose_and_duplicate_nothing(harness, tmp_path):
    """Two runs of different dates at once share shards/, GX and the catalog. An earlier date
    introduced 8 prompts and 4 are added; then both dates run together: each draws its fresh
    samples (samples_per_run: 1) and only one of them may take the 4 new prompts' first
    samples. Each run stops at its first shard write until both have got there, so they
    overlap however slowly either starts."""
    for limit, per_run, folder in ((8, 0, "before"), (12, 1, "after")):
        (tmp_path / folder).mkdir()
        write_config(tmp_path / folder, "nightly", **{
            "limit: 12": f"limit: {limit}", "max_tokens: 256": "max_tokens: 16",
            "keep_truncated: false": "keep_truncated: true",
            "samples_per_prompt: 1": f"samples_per_prompt: 1\n  samples_per_run: {per_run}"})
    data_dir, days = tmp_path / "data", ["2026-03-01", "2026-03-02", "2026-03-03"]
    distill(dataset=str(tmp_path / "before" / "nightly.yaml"), run_date=date.fromisoformat(days[0]),
            shard_size=4, data_dir=str(data_dir))
    runs = [FlowProcess(data_dir, harness, str(tmp_path / "after" / "nightly.yaml"),
                        run_date=date.fromisoformat(day), crash_at="shard-write:1:machine")
            for day in days[1:]]
    with killed_on_failure(*runs):
        for run in runs:
            wait_until_stopped(run)
        for run in runs:
            os.killpg(run.process.pid, signal.SIGCONT)
    for code, output in [run.finish() for run in runs]:
        assert code == 0, output[-3000:]
    (overlap,), = catalog(data_dir, "SELECT epoch(min(finished_at) - max(started_at)) FROM runs "
                                    f"WHERE run_date > DATE '{days[0]}'")
    first = catalog(data_dir, "SELECT CAST(run_date AS VARCHAR), count(*), count(DISTINCT "
                              "prompt_id) FROM published WHERE sample_round = 'first' "
                              "GROUP BY ALL ORDER BY 1")
    rounds = catalog(data_dir, "SELECT sample_round, CAST(run_date AS VARCHAR), count(*) FROM "
                               "published WHERE sample_round <> 'first' GROUP BY ALL ORDER BY 1")
    logger.info("the runs overlapped %.1f s; first samples (date, rows, prompts) %s; "
                "fresh samples (round, date, rows) %s", overlap, first, rounds)
    assert overlap > 0, "the two runs did not overlap in time"
    assert len(first) == 2 and first[0] == (days[0], 8, 8) and first[1][1:] == (4, 4)
    taker = first[1][0]
    assert taker in days[1:]
    assert rounds == [(days[1], days[1], 12 if taker == days[1] else 8), (days[2], days[2], 12)]
    (rows, samples), = catalog(data_dir, "SELECT count(*), count(DISTINCT (prompt_id, "
                                         "sample_round, sample_index)) FROM published")
    assert rows == samples == 12 + sum(r[2] for r in rounds)
    assert catalog(data_dir, "SELECT DISTINCT status FROM shards") == [("generated",)]
    validations = catalog(data_dir, "SELECT success, result_path FROM validations")
    assert len(validations) >= 6 and all(success for success, _ in validations)
    assert all(json.loads(Path(path).read_text())["success"] for _, path in validations)


def wait_until_stopped(flow: FlowProcess, timeout: float = 600) -> None:
    """Until the flow process is stopped (SIGSTOP at a `:machine` crash point)."""
    deadline = time.monotonic() + timeout
    while process_state(flow.process.pid) != "T":
        assert flow.process.poll() is None, flow.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the flow did not stop in {timeout} s"
        time.sleep(0.5)


def process_state(pid: int) -> str:
    """R, S, T (stopped)…: the field after the command name in /proc/<pid>/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


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
    config = write_config(tmp_path, "bad_rows", **SHORT, **{
        "path: data/gsm8k/test.jsonl": f"path: {source}", "limit: 12": "limit: 100",
        "max_prompt_chars: 2000": "max_prompt_chars: 50000",
        "text_columns: [question, answer]": "id_column: id\ntext_columns: [question, answer]"})
    summary = distill(dataset=str(config), run_date=RUN_DATE, shard_size=4,
                      data_dir=str(tmp_path / "data"))
    assert summary["rows_published"] == 2
    reasons = catalog(tmp_path / "data", "SELECT stage, coalesce(CAST(source_row AS VARCHAR), "
                                         "prompt_id), reason FROM rejected_rows")
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
    ({"max_tokens: 256": "max_tokens: -3"}, "sampling.max_tokens"),
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


def test_a_pair_the_engine_cannot_build_fails_each_shard_once_with_one_message(
        harness, tmp_path, tiny_pair, caplog):
    """Weights with a tensor missing pass the checks before the run (the header is sound) but
    vLLM refuses to load them: the pair is built once, no shard is retried, and the run's
    message says the cause once, naming every shard it hit."""
    from safetensors.torch import load_file, save_file

    theta = tmp_path / "theta-without-final-norm"
    shutil.copytree(tiny_pair[1], theta)
    tensors = load_file(theta / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, theta / "model.safetensors", metadata={"format": "pt"})
    config = write_config(tmp_path, "unbuildable", **SHORT,
                          **{"theta: tiny:theta": f"theta: {theta}"})
    data_dir = tmp_path / "data"
    with pytest.raises(RunFailed) as failure, caplog.at_level(logging.INFO, "tasks.engines"):
        distill(dataset=str(config), run_date=RUN_DATE, shard_size=4, data_dir=str(data_dir))
    message = str(failure.value)
    assert caplog.text.count("building the engine pair") == 1, caplog.text
    assert message.count("cannot build the engine pair") == 1, message
    assert "shards 0, 1, 2 failed: models.teacher " in message, message
    assert f"models.theta {str(theta)!r}: cannot build the engine pair" in message, message
    assert "model.norm.weight" in message, message
    assert catalog(data_dir, "SELECT status, count(*) FROM shards GROUP BY status") == \
        [("failed", 3)]
    assert not (data_dir / "published").exists()
    (flow_run_id,), = catalog(data_dir, "SELECT flow_run_id FROM runs")
    assert shard_attempts(flow_run_id) == [1, 1, 1]


def shard_attempts(flow_run_id: str) -> list[int]:
    """How often each generate-shard task of a flow run ran, once the server has recorded
    all three as failed (task run states reach it as events, a moment later)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 300
    with get_client(sync_client=True) as client:
        while True:
            runs = [task_run for task_run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                if task_run.name.startswith("generate-shard")]
            if [r.state_name for r in runs] == ["Failed"] * 3 or time.monotonic() > deadline:
                return sorted(r.run_count for r in runs)
            time.sleep(0.5)


def test_all_or_nothing_gate_keeps_the_partition_unpublished(harness, tmp_path):
    config = write_config(tmp_path, "gated", **SHORT,
                          **{"min_rows: 1": "min_rows: 1\n  all_or_nothing: true"})
    data_dir = tmp_path / "data"
    first = distill(dataset=str(config), run_date=RUN_DATE, shard_size=4, data_dir=str(data_dir))
    published = partition(data_dir, "gated").read_bytes()
    victim = sorted((data_dir / "shards" / "gated").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    column = table.column_names.index("alpha_min")
    pq.write_table(table.set_column(column, "alpha_min", [[0.1] * table.num_rows]), victim)
    with pytest.raises(RunFailed, match=r"alpha_min") as failure:
        distill(dataset=str(config), run_date=RUN_DATE, shard_size=4, data_dir=str(data_dir))
    assert "nothing published" in str(failure.value)
    assert first["rows_published"] == 12
    assert partition(data_dir, "gated").read_bytes() == published
