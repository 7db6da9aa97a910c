"""Stage a dataset's source into the warehouse: normalise, id and hash rows; reject bad ones."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
from prefect import task

from sampler.errors import ConfigError
from sampler.models import ResolvedModel
from sampler.prompts import (Conversation, Prompt, control_token_strings, conversation_problem,
                             stored_prompt)
from tasks.config import DatasetConfig, SourceConfig
from tasks.ledger import RunLedger
from tasks.sql import connect

logger = logging.getLogger(__name__)

#: A JSON escape of a UTF-16 surrogate: paired (an emoji) or lone (no UTF-8 form).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
PROMPT_COLUMNS = ["prompt_id", "content_hash", "source_row", "fields", "teacher_prompt",
                  "theta_prompt"]


@dataclass(frozen=True)
class StagedPrompt:
    """A source row made into each model's prompt: a text or, from a dataset's
    `prompts.messages_column`, a conversation whose last user turn the template made."""

    source_row: int
    prompt_id: str
    content_hash: str
    teacher_prompt: Prompt
    theta_prompt: Prompt
    fields: dict[str, str]

    @property
    def version(self) -> tuple[str, str]:
        """(prompt_id, content_hash): a changed prompt is a new version of the same id."""
        return self.prompt_id, self.content_hash


def lone_surrogate(record: dict[str, Any]) -> tuple[str, str] | None:
    """(field, problem) for the first field of `record` holding a lone surrogate: valid JSON
    (`"\\ud800"`) with no UTF-8 form, which no table or Parquet file can store."""
    for key, value in record.items():
        text = json.dumps([key, value], ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            return key, (f"field {ascii(key)} holds a lone surrogate "
                         f"(U+{ord(text[error.start]):04X}), which no UTF-8 text can hold")
    return None


def read_jsonl(path: Path, limit: int | None, id_column: str | None
               ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """JSONL read line by line, so one bad line (invalid UTF-8, broken JSON, a lone
    surrogate) is one reject, with the row's id where it has one.

    The frame's index is the line number, kept apart from the row's fields: a field named
    `source_row` is the source's own and cannot stand in for it."""
    records, numbers, rejects = [], [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not raw.strip():
                continue
            problem, prompt_id = None, None
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    problem = f"not a JSON object but {type(record).__name__}"
                elif SURROGATE_ESCAPE.search(raw) and (found := lone_surrogate(record)):
                    field, problem = found
                    if field != id_column and not is_null(record.get(id_column)):
                        prompt_id = str(record[id_column])
            except UnicodeDecodeError as error:
                problem = f"invalid UTF-8 at byte {error.start} of the line"
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error})"
            if problem:
                rejects.append({"source_row": number, "prompt_id": prompt_id,
                                "reason": f"row {number}: {problem}",
                                "raw": raw[:4000].decode("utf-8", errors="replace")})
                continue
            records.append(record)
            numbers.append(number)
    return pd.DataFrame.from_records(records, index=pd.Index(numbers, dtype="int64")), rejects


def single_select(query: str) -> str:
    """The text of `query` if it is exactly one SELECT statement: anything else (a second
    statement, COPY, DROP, ATTACH) is refused before it runs."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as error:
        raise ConfigError(f"source.query: not one valid DuckDB statement: {error}") from None
    kinds = [statement.type.name for statement in statements]
    if kinds != ["SELECT"]:
        raise ConfigError(f"source.query: must be exactly one SELECT statement; it has "
                          f"{len(kinds)} statement(s) of type(s) {kinds}")
    return statements[0].query


@contextlib.contextmanager
def sandboxed(connection: duckdb.DuckDBPyConnection, readable: Path | None
              ) -> Iterator[duckdb.DuckDBPyConnection]:
    """`connection` able to read files only under `readable` (none when None), closed
    afterwards. DuckDB refuses to lift either setting once external access is off."""
    try:
        if readable is not None and readable.is_dir():
            connection.execute("SET allowed_directories = ?", [[str(readable)]])
        elif readable is not None:
            connection.execute("SET allowed_paths = ?", [[str(readable)]])
        connection.execute("SET enable_external_access = false")
        yield connection
    finally:
        connection.close()


def run_source_query(source: SourceConfig, catalog: Path | None) -> pd.DataFrame:
    """A dataset's DuckDB query, where it cannot write: one SELECT, reading files only under
    `source.path` (none without one), run in memory or, when it names tables, on the catalog
    opened read-only."""
    query = single_select(source.query or "")
    readable = source.resolved_path() if source.path else None
    if readable is not None and not readable.exists():
        raise ConfigError(f"source.path: {readable} does not exist")
    try:
        with sandboxed(duckdb.connect(), readable) as probe:
            names_tables = bool(probe.get_table_names(query))
        connection = (connect(catalog, read_only=True) if names_tables and catalog is not None
                      else duckdb.connect())
        with sandboxed(connection, readable) as connection:
            relation = connection.sql(query)
            return (relation.limit(source.limit) if source.limit else relation).df()
    except duckdb.Error as error:
        raise ConfigError(f"source.query: cannot run it: {error}") from error


def read_file(source: SourceConfig, path: Path) -> pd.DataFrame:
    """A CSV or Parquet source, read by DuckDB in memory from the bound path."""
    connection = duckdb.connect()
    try:
        relation = (connection.read_csv(str(path)) if source.format == "csv"
                    else connection.read_parquet(str(path)))
        return (relation.limit(source.limit) if source.limit else relation).df()
    finally:
        connection.close()


def read_source(config: DatasetConfig, catalog: Path | None = None
                ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Source rows indexed by their 1-based row number, and rows unreadable on their own (as
    rejects). A DuckDB query may read the `catalog`, read-only.

    A source that cannot be read at all, or lacks a configured column, raises naming it.
    """
    source = config.source
    rejects: list[dict[str, Any]] = []
    if source.format == "duckdb_query":
        frame = run_source_query(source, catalog)
    else:
        path = source.resolved_path()
        if not path.is_file():
            raise ConfigError(f"source.path: {path} does not exist or is not a file")
        try:
            if source.format == "jsonl":
                frame, rejects = read_jsonl(path, source.limit, config.id_column)
            else:
                frame = read_file(source, path)
        except (duckdb.Error, OSError) as error:
            raise ConfigError(f"source: cannot read {source.path}: {error}") from error
    if source.format != "jsonl":
        frame.index = pd.RangeIndex(1, len(frame) + 1)
    missing = [c for c in [*config.source_columns, *filter(None, [config.id_column])]
               if c not in frame.columns]
    if missing:
        raise ConfigError(f"source: column(s) {missing} missing; it has {list(frame.columns)}")
    return frame, rejects


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt's text, over every turn of a conversation."""
    return len(prompt) if isinstance(prompt, str) else sum(len(t["content"]) for t in prompt)


def is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def content_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def trie_pattern(strings: Iterable[str]) -> re.Pattern[str] | None:
    """A regex for any of `strings`, built as a trie (one branch per next character) so a
    search tests each position against first characters only, however many strings."""
    trie: dict[str, dict] = {}
    for text in strings:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = {}

    def branch(node: dict[str, dict]) -> str:
        arms = [re.escape(char) + branch(child) for char, child in node.items() if char]
        if not arms:
            return ""
        return "(?:" + "|".join(arms) + ")" + ("?" if "" in node else "")

    return re.compile(branch(trie)) if trie else None


class TextScreen:
    """Special and added token strings of either model's tokenizer, which source text must
    not hold: each would be read as that token, not as text (`<|im_end|>` ends the user's
    turn and what follows forges the next). One pass of one trie regex per text."""

    def __init__(self, token_owners: Mapping[str, tuple[str, ...]]) -> None:
        self.token_owners = dict(token_owners)
        self.tokens = trie_pattern(self.token_owners)

    def problem(self, field: str, text: str) -> str | None:
        """Why `text` (of `field`: "field 'question'", "field 'conversation' turn 2") cannot
        be staged, or None."""
        found = self.tokens and self.tokens.search(text)
        if not found:
            return None
        owners = self.token_owners[found.group()]
        return (f"{field} holds {found.group()!r}, a special token of the "
                f"{' and '.join(owners)} tokenizer{'s' * (len(owners) > 1)} (it would be read "
                f"as one, not as text)")


def model_text_screen(models: Sequence[ResolvedModel]) -> TextScreen:
    """The screen for source rows of the run's models (`check_models`): both tokenizers'
    special and added tokens."""
    owners: dict[str, list[str]] = {}
    for role, model in zip(("teacher", "theta"), models):
        for token in control_token_strings(model.tokenizer):
            owners.setdefault(token, []).append(role)
    return TextScreen({token: tuple(roles) for token, roles in owners.items()})


def normalise_rows(frame: pd.DataFrame, config: DatasetConfig, screen: TextScreen
                   ) -> tuple[list[StagedPrompt], list[dict[str, Any]]]:
    """Good rows as prompts; bad rows as rejects, each with a reason that names the row and
    the row's id where it has one (a reject is keyed by it)."""
    staged: dict[str, StagedPrompt] = {}
    rejects: list[dict[str, Any]] = []
    for row, record in zip(frame.index.tolist(), frame.to_dict("records")):
        raw_id = record.get(config.id_column) if config.id_column else None
        problem = None
        if config.id_column and is_null(raw_id):
            problem = f"id column '{config.id_column}' is NULL"
        prompt_id = None if problem or not config.id_column else str(raw_id)

        def reject(reason: str, row: int = row, record: dict = record,
                   prompt_id: str | None = prompt_id) -> None:
            rejects.append({"source_row": row, "prompt_id": prompt_id,
                            "reason": f"row {row}: {reason}",
                            "raw": json.dumps(record, default=str)[:4000]})

        fields: dict[str, str] = {}
        for column in config.text_columns:
            if problem:
                break
            value = record.get(column)
            fields[column] = text = "" if is_null(value) else str(value).strip()
            if is_null(value):
                problem = f"field '{column}' is missing (NULL)"
            elif not text:
                problem = f"field '{column}' is empty"
            else:
                problem = screen.problem(f"field '{column}'", text)
        turns: Conversation | None = None
        if not problem and config.prompts.messages_column:
            turns, problem = staged_conversation(record.get(config.prompts.messages_column),
                                                 config, screen)
        if problem:
            reject(problem)
            continue
        teacher_prompt, theta_prompt = row_prompts(config, fields, turns)
        if turns is not None:
            fields[config.prompts.messages_column] = stored_prompt(turns)
        longest = max(map(prompt_chars, (teacher_prompt, theta_prompt)))
        if longest > config.max_prompt_chars:
            reject(f"prompt has {longest} characters, over max_prompt_chars "
                   f"({config.max_prompt_chars})")
            continue
        digest = content_hash(fields)
        prompt_id = digest[:16] if prompt_id is None else prompt_id
        earlier = staged.get(prompt_id)
        if earlier is not None:
            if earlier.content_hash != digest:
                reject(f"duplicate id '{prompt_id}' with different content")
            continue
        staged[prompt_id] = StagedPrompt(row, prompt_id, digest, teacher_prompt, theta_prompt,
                                         fields)
    return list(staged.values()), rejects


def staged_conversation(value: Any, config: DatasetConfig, screen: TextScreen
                        ) -> tuple[Conversation | None, str | None]:
    """The turns of a row's conversation, or why they cannot be staged (naming the turn):
    not a conversation both models can continue, or a turn holding a special token."""
    column = config.prompts.messages_column
    if isinstance(value, np.ndarray):  # a list column of a Parquet or DuckDB source
        value = value.tolist()
    if is_null(value):
        return None, f"field '{column}' is missing (NULL)"
    # the two models' formats differ in their system prompts only, which it does not read
    problem = conversation_problem(value, config.prompts.formats()[1])
    if problem:
        return None, f"field '{column}' {problem}"
    for number, turn in enumerate(value, start=1):
        problem = screen.problem(f"field '{column}' turn {number} ({turn['role']})",
                                 turn["content"])
        if problem:
            return None, problem
    return [{"role": turn["role"], "content": turn["content"]} for turn in value], None


def row_prompts(config: DatasetConfig, fields: dict[str, str], turns: Conversation | None
                ) -> tuple[Prompt, Prompt]:
    """Each model's prompt: its template over the row's fields or, for a conversation, the
    turns with the last user turn made by its template (`{<messages_column>}` is that
    turn's text)."""
    templates = (config.prompts.teacher_template, config.prompts.theta_template)
    if turns is None:
        return tuple(template.format(**fields) for template in templates)
    column = config.prompts.messages_column
    last = turns[-1]["content"]
    return tuple([*turns[:-1], {"role": "user",
                                "content": template.format(**fields, **{column: last})}]
                 for template in templates)


@task(name="stage-prompts")
def stage_prompts(ledger: RunLedger, config: DatasetConfig,
                  models: Sequence[ResolvedModel]) -> list[StagedPrompt]:
    """Load the source into the warehouse; returns the usable prompts of this run."""
    frame, unreadable = read_source(config, ledger.data.catalog)
    prompts, rejects = normalise_rows(frame, config, model_text_screen(models))
    rejects = unreadable + rejects
    staged = pd.DataFrame([{**asdict(p), "fields": json.dumps(p.fields),
                            "teacher_prompt": stored_prompt(p.teacher_prompt),
                            "theta_prompt": stored_prompt(p.theta_prompt)} for p in prompts],
                          columns=PROMPT_COLUMNS)
    ledger.record_staged(staged, rejects)
    logger.info("staged %d prompts, rejected %d rows", len(prompts), len(rejects))
    return prompts
