"""The project's SQL lives in sql/*.sql; this loads it and opens the warehouse."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"


@cache
def query(name: str) -> str:
    """Text of sql/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text()


def connect(path: Path, wait_seconds: float = 120.0) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a warehouse file with the schema in place.

    DuckDB lets one process write a file at a time; another run or a reader holding it
    makes this wait and retry (up to `wait_seconds`) rather than fail.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            connection = duckdb.connect(str(path))
            break
        except duckdb.IOException as error:
            if "lock" not in str(error).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    connection.execute(query("schema"))
    return connection


@contextlib.contextmanager
def warehouse(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection for one piece of work, closed afterwards so other processes can write."""
    connection = connect(path)
    try:
        yield connection
    finally:
        connection.close()
