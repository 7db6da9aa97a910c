"""Curated rows with lineage, published as one Parquet file per (dataset, run_date) partition.

Publishing replaces exactly its own partition: the file is written beside the target and
renamed over it, so readers see the old partition or the new one, never a mix, and the
neighbouring partitions are never touched (unlike DuckDB's COPY ... OVERWRITE).
"""

from __future__ import annotations

import logging
import re
import subprocess
from datetime import date, datetime, UTC
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from tasks.config import REPO_ROOT, DatasetConfig
from tasks.atomic_files import write_atomically
from tasks.sql import query
from tasks.sql import warehouse as open_warehouse

logger = logging.getLogger(__name__)

FINAL_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


def code_version() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def final_answer(text: str | None) -> str | None:
    match = FINAL_ANSWER.search(text or "")
    return match.group(1).replace(",", "").rstrip(".") if match else None


def curate(table: pa.Table, config: DatasetConfig, reference_answers: dict[str, str],
           lineage: dict[str, object]) -> pa.Table:
    """Apply the dataset's filters and add lineage columns to every row."""
    if config.curation.gsm8k_answer_check:
        answers = [final_answer(text) for text in table["completion"].to_pylist()]
        correct = [answer is not None and answer == final_answer(reference_answers.get(prompt_id))
                   for answer, prompt_id in zip(answers, table["prompt_id"].to_pylist())]
        table = table.append_column("answer_correct", pa.array(correct))
        table = table.filter(pc.field("answer_correct"))
    rows = table.num_rows
    for name, value in lineage.items():
        table = table.append_column(name, pa.array([value] * rows))
    return table


def partition_path(published_root: Path, dataset: str, run_date: date) -> Path:
    partition = published_root / f"dataset={dataset}" / f"run_date={run_date.isoformat()}"
    return partition / "data.parquet"


def publish_partition(table: pa.Table, published_root: Path, dataset: str, run_date: date) -> Path:
    """Atomically replace one partition's file; other partitions are untouched."""
    path = partition_path(published_root, dataset, run_date)
    write_atomically(table, path, "publish")
    return path


def refresh_catalog(warehouse: Path, published_root: Path) -> None:
    """(Re)create the SQL views over the published Parquet and the run tables."""
    if not any(published_root.glob("*/*/*.parquet")):
        return
    glob = str(published_root.resolve() / "*" / "*" / "*.parquet")
    with open_warehouse(warehouse) as connection:
        connection.execute(query("catalog").format(published_glob=glob))


@task(name="publish-partition")
def publish(table: pa.Table, config: DatasetConfig, data_dir: str, run_date: date,
            reference_answers: dict[str, str], lineage: dict[str, object]) -> tuple[str, int]:
    root = Path(data_dir)
    curated = curate(table, config, reference_answers,
                     {**lineage, "created_at": datetime.now(UTC).replace(tzinfo=None)})
    path = publish_partition(curated, root / "published", config.name, run_date)
    refresh_catalog(root / "catalog.duckdb", root / "published")
    logger.info("published %d rows to %s", curated.num_rows, path)
    return str(path), curated.num_rows
