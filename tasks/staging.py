"""Stage a dataset's source into the warehouse: normalise, id and hash rows; reject bad ones."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any

import duckdb
import pandas as pd
from prefect import task

from sampler.errors import ConfigError
from tasks.config import DatasetConfig
from tasks.sql import query
from tasks.sql import warehouse as open_warehouse

logger = logging.getLogger(__name__)

READERS = {"csv": "read_csv_auto(?)", "parquet": "read_parquet(?)"}


@dataclass(frozen=True)
class StagedPrompt:
    source_row: int
    prompt_id: str
    content_hash: str
    teacher_prompt: str
    theta_prompt: str
    fields: dict[str, str]


def read_jsonl(path: Path, limit: int | None) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """JSONL read line by line, so one bad line (invalid UTF-8, broken JSON) is one reject."""
    records, rejects = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not raw.strip():
                continue
            problem = None
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    problem = f"not a JSON object but {type(record).__name__}"
            except UnicodeDecodeError as error:
                problem = f"invalid UTF-8 at byte {error.start} of the line"
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error})"
            if problem:
                rejects.append({"source_row": number, "prompt_id": None,
                                "reason": f"row {number}: {problem}",
                                "raw": raw[:4000].decode("utf-8", errors="replace")})
                continue
            records.append({"source_row": number, **record})
    return pd.DataFrame.from_records(records), rejects


def read_source(connection: duckdb.DuckDBPyConnection, config: DatasetConfig
                ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Source rows with `source_row`, and rows unreadable on their own (as rejects).

    A source that cannot be read at all, or lacks a configured column, raises naming it.
    """
    source = config.source
    rejects: list[dict[str, Any]] = []
    path = None if source.format == "duckdb_query" else source.resolved_path()
    if path is not None and not path.is_file():
        raise ConfigError(f"source.path: {path} does not exist or is not a file")
    try:
        if source.format == "jsonl":
            frame, rejects = read_jsonl(path, source.limit)
        else:
            reader = f"({source.query})" if path is None else READERS[source.format]
            sql = query("read_source").format(reader=reader)
            if source.limit:
                sql += f"\nLIMIT {int(source.limit)}"
            frame = connection.execute(sql, [] if path is None else [str(path)]).df()
    except (duckdb.Error, OSError) as error:
        raise ConfigError(f"source: cannot read {source.path or 'query'}: {error}") from error
    missing = [c for c in [*config.text_columns, *filter(None, [config.id_column])]
               if c not in frame.columns]
    if missing:
        raise ConfigError(f"source: column(s) {missing} missing; it has "
                          f"{[c for c in frame.columns if c != 'source_row']}")
    return frame, rejects


def content_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def normalise_rows(frame: pd.DataFrame, config: DatasetConfig
                   ) -> tuple[list[StagedPrompt], list[dict[str, Any]]]:
    """Good rows as prompts; bad rows as rejects, each with a reason that names the row."""
    staged: dict[str, StagedPrompt] = {}
    rejects: list[dict[str, Any]] = []
    for record in frame.to_dict("records"):
        row = int(record["source_row"])

        def reject(reason: str, prompt_id: str | None = None, row: int = row,
                   record: dict = record) -> None:
            rejects.append({"source_row": row, "prompt_id": prompt_id,
                            "reason": f"row {row}: {reason}",
                            "raw": json.dumps(record, default=str)[:4000]})

        fields, problem = {}, None
        for column in config.text_columns:
            value = record.get(column)
            if value is None or (isinstance(value, float) and pd.isna(value)):
                problem = f"field '{column}' is missing (NULL)"
                break
            text = str(value).strip()
            if not text:
                problem = f"field '{column}' is empty"
                break
            fields[column] = text
        if problem:
            reject(problem)
            continue
        teacher_prompt = config.prompts.teacher_template.format(**fields)
        theta_prompt = config.prompts.theta_template.format(**fields)
        longest = max(len(teacher_prompt), len(theta_prompt))
        if longest > config.max_prompt_chars:
            reject(f"prompt has {longest} characters, over max_prompt_chars "
                   f"({config.max_prompt_chars})")
            continue
        digest = content_hash(fields)
        if config.id_column:
            raw_id = record.get(config.id_column)
            if raw_id is None or (isinstance(raw_id, float) and pd.isna(raw_id)):
                reject(f"id column '{config.id_column}' is NULL")
                continue
            prompt_id = str(raw_id)
        else:
            prompt_id = digest[:16]
        earlier = staged.get(prompt_id)
        if earlier is not None:
            if earlier.content_hash != digest:
                reject(f"duplicate id '{prompt_id}' with different content", prompt_id)
            continue
        staged[prompt_id] = StagedPrompt(row, prompt_id, digest, teacher_prompt, theta_prompt,
                                         fields)
    return list(staged.values()), rejects


REJECT_COLUMNS = ["run_id", "dataset", "stage", "source_row", "prompt_id", "reason", "raw",
                  "rejected_at"]


def _rejects_frame(dataset: str, run_id: str, stage: str, rejects: list[dict[str, Any]],
                   now: datetime) -> pd.DataFrame:
    rows = [{"source_row": None, "prompt_id": None, "raw": None, **r, "run_id": run_id,
             "dataset": dataset, "stage": stage, "rejected_at": now} for r in rejects]
    return pd.DataFrame(rows, columns=REJECT_COLUMNS)


def write_staged(connection: duckdb.DuckDBPyConnection, config: DatasetConfig, run_id: str,
                 prompts: list[StagedPrompt], rejects: list[dict[str, Any]]) -> None:
    """Upsert prompts and append rejects in one transaction."""
    now = datetime.now(UTC).replace(tzinfo=None)
    staged = pd.DataFrame([{"dataset": config.name, "prompt_id": p.prompt_id,
                            "content_hash": p.content_hash, "source_row": p.source_row,
                            "fields": json.dumps(p.fields), "teacher_prompt": p.teacher_prompt,
                            "theta_prompt": p.theta_prompt, "staged_at": now} for p in prompts],
                          columns=["dataset", "prompt_id", "content_hash", "source_row", "fields",
                                   "teacher_prompt", "theta_prompt", "staged_at"])
    rejected = _rejects_frame(config.name, run_id, "stage", rejects, now)
    connection.execute("BEGIN TRANSACTION")
    try:
        connection.register("staged", staged)
        connection.execute(query("upsert_prompts"))
        connection.register("rejected", rejected)
        connection.execute(query("insert_rejects"))
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise
    finally:
        connection.unregister("staged")
        connection.unregister("rejected")


def record_rejects(connection: duckdb.DuckDBPyConnection, dataset: str, run_id: str, stage: str,
                   rejects: list[dict[str, Any]]) -> None:
    """Append rejects found after staging (e.g. prompts too long for the model's context)."""
    if not rejects:
        return
    connection.register("rejected", _rejects_frame(dataset, run_id, stage, rejects,
                                                   datetime.now(UTC).replace(tzinfo=None)))
    try:
        connection.execute(query("insert_rejects"))
    finally:
        connection.unregister("rejected")


@task(name="stage-prompts")
def stage_prompts(warehouse: str, config: DatasetConfig, run_id: str) -> list[StagedPrompt]:
    """Load the source into the warehouse; returns the usable prompts of this run."""
    with open_warehouse(Path(warehouse)) as connection:
        frame, unreadable = read_source(connection, config)
        prompts, rejects = normalise_rows(frame, config)
        rejects = unreadable + rejects
        write_staged(connection, config, run_id, prompts, rejects)
    logger.info("staged %d prompts, rejected %d rows", len(prompts), len(rejects))
    return prompts
