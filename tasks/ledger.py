"""Every catalog write of one run, in one place: the run's ledger.

Each write is one DuckDB connection, which DuckDB grants to one process at a time, so a
read-then-write inside one (claiming prompts) is atomic across concurrent runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from datetime import date, datetime, UTC
from typing import Any, NamedTuple

import duckdb
import pandas as pd
import pyarrow as pa

from tasks.config import DatasetConfig
from tasks.layout import DataDir
from tasks.lineage import Generation
from tasks.locking import run_in_progress
from tasks.sql import create_views, run_sql
from tasks.sql import warehouse as open_warehouse
from tasks.validation import ValidationOutcome

REJECT_COLUMNS = ["run_id", "dataset", "stage", "source_row", "prompt_id", "reason", "raw",
                  "reject_key", "seen_at"]
VERSION_SCHEMA = pa.schema([("prompt_id", pa.string()), ("content_hash", pa.string())])


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def run_id_of(dataset: str, run_date: date, flow_run_id: str) -> str:
    """A run's id: its dataset, date and the first characters of its Prefect flow run id."""
    return f"{dataset}-{run_date.isoformat()}-{flow_run_id[:8]}"


def _write_run(connection: duckdb.DuckDBPyConnection, **columns: Any) -> None:
    """Record a run's row (the schema's views over the run tables answer from the first run
    on)."""
    run_sql(connection, "record_run", **columns)


def record_refused_run(data: DataDir, dataset: str, run_date: date, flow_run_id: str,
                       message: str) -> None:
    """A run refused before it began, its dataset config not loaded: `dataset` is the name
    or path it was given, `message` why; `runs` and `latest_runs` say so."""
    at = now()
    with open_warehouse(data.catalog) as connection:
        _write_run(connection, run_id=run_id_of(dataset, run_date, flow_run_id),
                   dataset=dataset, run_date=run_date, flow_run_id=flow_run_id,
                   config_hash="", config=None, generation_hash=None, code_version=None,
                   code_dirty=None, status="failed", rows_published=0,
                   message=message[:2000], started_at=at, finished_at=at)


def reject_key(stage: str, reason: str, raw: str | None) -> str:
    """One key per distinct reject: the same row rejected for the same reason again is the
    same reject, however many runs see it."""
    return hashlib.sha256(json.dumps([stage, reason, raw]).encode()).hexdigest()[:20]


def versions_table(versions: list[tuple[str, str]]) -> pa.Table:
    """(prompt_id, content_hash) pairs as a relation for SQL."""
    return pa.table({"prompt_id": [v[0] for v in versions],
                     "content_hash": [v[1] for v in versions]}, schema=VERSION_SCHEMA)


class Claims(NamedTuple):
    """Prompt versions (prompt_id, content_hash) by who owns their first samples."""

    mine: set[tuple[str, str]]          # this run generates them
    through_date: set[tuple[str, str]]  # this date or an earlier one owns them


class RunLedger:
    """The catalog record of one run of one dataset and date."""

    def __init__(self, data: DataDir, config: DatasetConfig, run_date: date,
                 flow_run_id: str) -> None:
        self.data = data
        self.config = config
        self.run_date = run_date
        self.flow_run_id = flow_run_id
        self.run_id = run_id_of(config.name, run_date, flow_run_id)
        self.started_at = now()
        self.generation: Generation | None = None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with open_warehouse(self.data.catalog) as connection:
            yield connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._connection() as connection:
            connection.execute("BEGIN TRANSACTION")
            try:
                yield connection
                connection.execute("COMMIT")
            except Exception:
                connection.execute("ROLLBACK")
                raise

    def _record_run(self, connection: duckdb.DuckDBPyConnection, status: str,
                    rows_published: int | None = None, message: str | None = None) -> None:
        generation = self.generation
        _write_run(connection, run_id=self.run_id, dataset=self.config.name,
                   run_date=self.run_date, flow_run_id=self.flow_run_id,
                   config_hash=self.config.config_hash(), config=self.config.model_dump_json(),
                   generation_hash=generation and generation.key,
                   code_version=generation and generation.commit,
                   code_dirty=generation and generation.dirty, status=status,
                   rows_published=rows_published, message=message,
                   started_at=self.started_at,
                   finished_at=None if status == "running" else now())

    def begin(self, generation: Generation) -> None:
        """Mark runs of this dataset that died as crashed (this date's: the caller holds its
        lock; other dates': their locks are free), record the generation and this run."""
        self.generation = generation
        dataset = self.config.name
        with self._transaction() as connection:
            running = run_sql(connection, "running_dates", dataset=dataset).fetchall()
            dead = [day for (day,) in running if day == self.run_date
                    or not run_in_progress(self.data.root, dataset, day)]
            run_sql(connection, "mark_crashed", dataset=dataset, run_dates=dead)
            run_sql(connection, "record_generation", generation=generation.key,
                    dataset=self.config.name, sampler_version=generation.sampler_version,
                    settings=generation.settings, run_id=self.run_id, created_at=now())
            self._record_run(connection, "running")

    def finish(self, status: str, rows_published: int, message: str | None) -> None:
        with self._connection() as connection:
            self._record_run(connection, status, rows_published, message)

    @contextlib.contextmanager
    def failure_recorded(self) -> Iterator[None]:
        """Record the run as failed, with the error, if the body raises."""
        try:
            yield
        except Exception as error:
            with self._connection() as connection:
                self._record_run(connection, "failed", 0,
                                 f"{type(error).__name__}: {error}"[:2000])
            raise

    def _write_rejects(self, connection: duckdb.DuckDBPyConnection, stage: str,
                       rejects: list[dict[str, Any]]) -> None:
        rows = [{"source_row": None, "prompt_id": None, "raw": None, **r, "stage": stage,
                 "run_id": self.run_id, "dataset": self.config.name, "seen_at": now()}
                for r in rejects]
        for row in rows:
            row["reject_key"] = reject_key(stage, row["reason"], row["raw"])
        frame = pd.DataFrame(rows, columns=REJECT_COLUMNS).drop_duplicates("reject_key")
        connection.register("rejected", frame)
        try:
            run_sql(connection, "record_rejects")
        finally:
            connection.unregister("rejected")

    def record_staged(self, prompts: pd.DataFrame, rejects: list[dict[str, Any]]) -> None:
        """Upsert the staged prompts and record the source's rejects, in one transaction."""
        staged = prompts.assign(dataset=self.config.name, staged_at=now())
        with self._transaction() as connection:
            connection.register("staged", staged)
            try:
                run_sql(connection, "upsert_prompts")
            finally:
                connection.unregister("staged")
            self._write_rejects(connection, "stage", rejects)

    def record_rejects(self, stage: str, rejects: list[dict[str, Any]]) -> None:
        """Rejects found after staging (e.g. prompts too long for a model's context)."""
        if rejects:
            with self._connection() as connection:
                self._write_rejects(connection, stage, rejects)

    def claim_first_samples(self, versions: list[tuple[str, str]]) -> Claims:
        """Claim the first samples of the prompt versions (prompt_id, content_hash) that no
        other date owns. Another date owns a version its partition holds, a publish of it
        settled, or its run, still going, claimed. This date's earlier claims are redone."""
        key, dataset = self.generation.key, self.config.name
        with self._transaction() as connection:
            claimed_dates = run_sql(connection, "claimed_dates", dataset=dataset, generation=key,
                                    run_date=self.run_date).fetchall()
            live = [day for (day,) in claimed_dates
                    if run_in_progress(self.data.root, dataset, day)]
            files = [str(path) for day, path in self.data.partitions(dataset, key).items()
                     if day != self.run_date]
            in_partitions = VERSION_SCHEMA.empty_table()
            if files:
                in_partitions = run_sql(connection, "first_samples_in",
                                        files=files).to_arrow_table()
            connection.register("candidates", versions_table(versions))
            connection.register("in_partitions", in_partitions)
            try:
                owned = run_sql(connection, "claim_first_samples", dataset=dataset,
                               generation=key, run_date=self.run_date, run_id=self.run_id,
                               live_dates=live, claimed_at=now()).fetchall()
            finally:
                connection.unregister("candidates")
                connection.unregister("in_partitions")
        return Claims({(p, h) for p, h, ours in owned if ours}, {(p, h) for p, h, _ in owned})

    def mark_published(self, versions: list[tuple[str, str]]) -> None:
        """These prompt versions' first samples are settled by this date's partition (kept
        or curated out), so no other date generates them again."""
        with self._connection() as connection:
            connection.register("covered", versions_table(versions))
            try:
                run_sql(connection, "mark_published", run_id=self.run_id)
            finally:
                connection.unregister("covered")

    def record_shard(self, *, index: int, key: str, sample_round: str, prompts: int,
                     status: str, rows: int | None, validation: ValidationOutcome | None,
                     error: str | None) -> None:
        """A settled shard and, if it was validated, its validation."""
        failed = validation and (", ".join(validation.failed_expectations) or None)
        with self._transaction() as connection:
            run_sql(connection, "record_shard", run_id=self.run_id, dataset=self.config.name,
                    generation=self.generation.key, sample_round=sample_round,
                    shard_index=index, shard_key=key, prompts=prompts, rows=rows,
                    status=status, validated=validation and validation.success,
                    failed_expectations=failed,
                    result_path=validation and validation.result_path, error=error)
            if validation is not None:
                self._record_validation(connection, "shard", key, validation)

    def _record_validation(self, connection: duckdb.DuckDBPyConnection, scope: str,
                           shard_key: str | None, outcome: ValidationOutcome) -> None:
        run_sql(connection, "record_validation", run_id=self.run_id, dataset=self.config.name,
                scope=scope, shard_key=shard_key, success=outcome.success,
                failed_expectations=", ".join(outcome.failed_expectations) or None,
                result_path=outcome.result_path, docs_path=outcome.docs_path)

    def record_dataset_validation(self, outcome: ValidationOutcome) -> None:
        with self._connection() as connection:
            self._record_validation(connection, "dataset", None, outcome)

    def refresh_views(self) -> None:
        """(Re)create the SQL views over the published Parquet."""
        if any(self.data.published.glob("*/*/*/*.parquet")):
            with self._connection() as connection:
                create_views(connection, "catalog", published_glob=self.data.published_glob())

    def rejected_count(self) -> int:
        """Distinct rejects this run saw (recorded now or by an earlier run)."""
        with self._connection() as connection:
            return run_sql(connection, "count_rejects", run_id=self.run_id).fetchone()[0]
