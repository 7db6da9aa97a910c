"""The README's first command: run the demo dataset end to end, then query the result with SQL.

No Prefect server is needed (ephemeral mode); tiny local models are built on first use.
"""

from __future__ import annotations

import logging
import sys

import duckdb

from flows.distill import RunFailed, distill

logger = logging.getLogger("demo")

QUERY = "SELECT * FROM rows_per_dataset_date"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = distill(dataset="demo", shard_size=4)
    except RunFailed as error:
        logger.error("the demo run failed: %s", error)
        return 1
    catalog = summary["catalog"]
    connection = duckdb.connect(catalog, read_only=True)
    try:
        result = connection.execute(QUERY).fetchdf()
    finally:
        connection.close()
    print(f"\nPublished {summary['rows_published']} rows to {summary['partition']}")
    print(f"Catalog: {catalog}   (views: published, rows_per_dataset_date, alpha_by_dataset, "
          "rejected_rows, latest_runs)")
    print(f"Validation Data Docs: {summary['docs']}")
    print(f"\n{QUERY};\n{result.to_string(index=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
