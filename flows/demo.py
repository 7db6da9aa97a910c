"""The README's first command: run the demo dataset end to end, then query the result with SQL.

No Prefect server is needed (ephemeral mode, unless PREFECT_API_URL names one). The screen shows what the demo did and the
SQL answer; everything else (Prefect's temporary server, vLLM, Great Expectations' progress
bars) goes to a log file whose path the demo prints, so nothing that is not the user's to act
on fills the first screen.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TextIO

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

logger = logging.getLogger("demo")

QUERY = "SELECT * FROM rows_per_dataset_date"


def send_output_to(path: Path) -> TextIO:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so child processes'
    and Prefect's exit-time messages too) to `path`; return a stream to the terminal for what
    the user should see."""
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return terminal


def main() -> int:
    from flows.distill import DEFAULT_DATA_DIR

    log_path = Path(DEFAULT_DATA_DIR) / "logs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}.log"
    terminal = send_output_to(log_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    console = logging.StreamHandler(terminal)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.info("Running the demo dataset: 12 GSM8K problems, the tiny trained model pair, "
                "%s (a minute or two on 2 cores).", prefect_mode())
    logger.info("Full log: %s", log_path)
    return run_demo(terminal)


def prefect_mode() -> str:
    """Where this run's flow and task runs are recorded: the configured API, or a temporary
    server Prefect starts for this process alone."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return f"Prefect API at {url}" if url else "Prefect in ephemeral mode (no server needed)"


def example_row(partition: str | None) -> str:
    """One published sample: what the student was asked and the mixture's answer."""
    import pyarrow.parquet as pq

    if not partition:
        return "(nothing published)\n"
    columns = ["theta_prompt", "completion_text"]
    row = pq.read_table(partition, columns=columns).slice(0, 1).to_pylist()
    if not row:
        return "(the partition is empty)\n"
    return (f"One sample. The student saw:\n  {row[0]['theta_prompt'][:300]}\n"
            f"The mixture wrote:\n  {row[0]['completion_text'][:400]}\n")


def left_out(partition: str) -> str:
    """What curation left out of the partition, from its card's facts."""
    import pyarrow.parquet as pq

    from tasks.dataset_card import PartitionFacts

    facts = PartitionFacts.from_metadata(pq.read_schema(partition).metadata, partition)
    truncated = facts.counts["left_out_truncated"]
    return (f" ({truncated} more stopped at max_tokens, left out)" if truncated
            else "")


def run_demo(terminal: TextIO) -> int:
    import duckdb

    from flows.distill import RunFailed, distill

    try:
        summary = distill(dataset="demo", shard_size=4)
    except RunFailed as error:
        logger.error("The demo run failed: %s", error)
        return 1
    except Exception as error:  # noqa: BLE001 - the user gets one line; the log has the rest
        logger.error("The demo run failed: %s: %s", type(error).__name__, error)
        return 1
    catalog = summary["catalog"]
    connection = duckdb.connect(catalog, read_only=True)
    try:
        result = connection.execute(QUERY).fetchdf()
    finally:
        connection.close()
    if summary["partition"]:
        terminal.write(f"\n{example_row(summary['partition'])}")
        terminal.write(f"\nPublished {summary['rows_published']} rows"
                       f"{left_out(summary['partition'])} to {summary['partition']}\n"
                       f"Dataset card beside it (README.md): datasets.load_dataset("
                       f"'{Path(summary['partition']).parent}') opens the folder for training\n")
    else:
        terminal.write("\nNothing new to sample today: every demo prompt was sampled on an earlier "
                       "date (a run generates only what is new for its date; see the table).\n")
    terminal.write(
        f"Catalog: {catalog}   (views: published, rows_per_dataset_date, alpha_by_dataset, "
        "rejected_rows, latest_runs)\n"
        f"Validation Data Docs: {summary['docs']}\n"
        f"\n{QUERY};\n{result.to_string(index=False)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
