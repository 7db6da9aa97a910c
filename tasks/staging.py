"""Stage a dataset's source into the warehouse: normalise, id and hash rows; reject bad ones."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any

import duckdb
import pandas as pd
from prefect import task

from sampler.errors import ConfigError
from tasks.config import DatasetConfig
from tasks.ledger import RunLedger
from tasks.sql import query

logger = logging.getLogger(__name__)

READERS = {"csv": "read_csv_auto(?)", "parquet": "read_parquet(?)"}
PROMPT_COLUMNS = ["prompt_id", "content_hash", "source_row", "fields", "teacher_prompt",
                  "theta_prompt"]


@dataclass(frozen=True)
class StagedPrompt:
    source_row: int
    prompt_id: str
    content_hash: str
    teacher_prompt: str
    theta_prompt: str
    fields: dict[str, str]

    @property
    def version(self) -> tuple[str, str]:
        """(prompt_id, content_hash): a changed prompt is a new version of the same id."""
        return self.prompt_id, self.content_hash


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


@task(name="stage-prompts")
def stage_prompts(ledger: RunLedger, config: DatasetConfig) -> list[StagedPrompt]:
    """Load the source into the warehouse; returns the usable prompts of this run."""
    with ledger.reading() as connection:
        frame, unreadable = read_source(connection, config)
    prompts, rejects = normalise_rows(frame, config)
    rejects = unreadable + rejects
    staged = pd.DataFrame([{**asdict(p), "fields": json.dumps(p.fields)} for p in prompts],
                          columns=PROMPT_COLUMNS)
    ledger.record_staged(staged, rejects)
    logger.info("staged %d prompts, rejected %d rows", len(prompts), len(rejects))
    return prompts
