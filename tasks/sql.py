"""The project's SQL lives in sql/*.sql; this loads and runs it and opens the warehouse."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)
PARAMETER = re.compile(r"\$([A-Za-z_]\w*)")
COMMENT = re.compile(r"--[^\n]*")


@cache
def query(name: str) -> str:
    """Text of sql/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text()


@cache
def statements(name: str) -> tuple[str, ...]:
    """The statements of sql/<name>.sql (split where a line ends with `;`)."""
    return tuple(s for s in STATEMENT_END.split(query(name)) if s.strip())


def run_sql(connection: duckdb.DuckDBPyConnection, name: str,
            **parameters: Any) -> duckdb.DuckDBPyConnection:
    """Run sql/<name>.sql, each statement with the named parameters it uses (DuckDB refuses
    extra ones); returns the connection, holding the last statement's result."""
    for statement in statements(name):
        used = set(PARAMETER.findall(COMMENT.sub("", statement)))
        connection.execute(statement, {k: v for k, v in parameters.items() if k in used})
    return connection


def create_views(connection: duckdb.DuckDBPyConnection, name: str, **literals: str
                 ) -> None:
    """Run sql/<name>.sql, view definitions, which DuckDB cannot prepare: each `$name` in it
    becomes the string literal of its value as DuckDB itself quotes it (ConstantExpression),
    so a value can never end its literal and add SQL."""
    def literal(match: re.Match) -> str:
        return str(duckdb.ConstantExpression(str(literals[match.group(1)])))

    for statement in statements(name):
        connection.execute(PARAMETER.sub(literal, COMMENT.sub("", statement)))


@cache
def schema_hash() -> str:
    """Version of sql/schema.sql: the hash of its text."""
    return hashlib.sha256(query("schema").encode()).hexdigest()[:16]


def ensure_schema(connection: duckdb.DuckDBPyConnection) -> None:
    """Run sql/schema.sql unless it last ran to its end on this catalog in this version."""
    try:
        current = run_sql(connection, "schema_version").fetchone()[0]
    except duckdb.CatalogException:          # a new catalog, or one made before versions
        current = None
    if current != schema_hash():
        run_sql(connection, "schema", schema_hash=schema_hash())


class CatalogMissing(FileNotFoundError):
    """A catalog opened to read that no run has made yet: reading creates nothing."""


def connect(path: Path, wait_seconds: float = 120.0, read_only: bool = False
            ) -> duckdb.DuckDBPyConnection:
    """Open a warehouse file: to write, creating it if needed with the schema in place; to
    read, only if a run made it (a reader creates no file or folder, writes no schema).

    DuckDB lets one process write a file at a time; another run or a reader holding it
    makes this wait and retry (up to `wait_seconds`) rather than fail.
    """
    if read_only and not path.is_file():
        raise CatalogMissing(f"catalog {path} does not exist: it appears after the first run "
                             "of the flow with this data directory")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            connection = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as error:
            if "lock" not in str(error).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    if not read_only:
        ensure_schema(connection)
    return connection


@contextlib.contextmanager
def warehouse(path: Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection for one piece of work, closed afterwards so other processes can write.

    While it is open no other process can open the file: a read-then-write inside one
    connection is atomic across runs.
    """
    connection = connect(path, read_only=read_only)
    try:
        yield connection
    finally:
        connection.close()


def read_catalog(path: Path, text: str) -> list[tuple]:
    """Rows of one query on a read-only connection, closed at once: while a reader holds the
    file, no run can write it."""
    with warehouse(path, read_only=True) as connection:
        return connection.execute(text).fetchall()
