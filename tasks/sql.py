"""The project's SQL lives in sql/*.sql; this loads it and opens the warehouse."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"


@cache
def query(name: str) -> str:
    """Text of sql/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text()


def connect(path: Path) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a warehouse file with the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = duckdb.connect(str(path))
    connection.execute(query("schema"))
    return connection
