"""What a run tells people: Prefect artifacts (shard table, summary) and an α histogram."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

logger = logging.getLogger(__name__)


def alpha_histogram(table: pa.Table, dataset: str, path: Path) -> Path | None:
    """PNG histogram of every generated token's α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = np.concatenate([np.asarray(a, dtype=float) for a in table["alpha"].to_pylist()]
                            or [np.zeros(0)])
    if alphas.size == 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(alphas, bins=50, color="#3b6ea8")
    axis.set_xlabel("α (teacher weight) per token")
    axis.set_ylabel("tokens")
    axis.set_title(f"{dataset}: α over {alphas.size:,} tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@task(name="report-run")
def report_run(dataset: str, run_id: str, shard_rows: list[dict], summary: dict,
               published: pa.Table | None, report_dir: str) -> str:
    """Publish the shard table and a markdown summary as artifacts of this flow run."""
    key = f"{dataset}-shards".replace("_", "-")
    create_table_artifact(key=key, table=shard_rows, description=f"Shards of run {run_id}")
    histogram = None
    if published is not None and published.num_rows:
        histogram = alpha_histogram(published, dataset, Path(report_dir) / "alpha_hist.png")
    lines = [f"# Run {run_id}", "", f"- dataset: **{dataset}**",
             f"- status: **{summary['status']}**",
             f"- rows published: {summary['rows_published']}",
             f"- shards: {summary['shards_ok']} ok, {summary['shards_quarantined']} quarantined, "
             f"{summary['shards_failed']} failed ({summary['shards_reused']} reused)",
             f"- rejected rows: {summary['rejected_rows']}"]
    if summary.get("alpha"):
        alpha = summary["alpha"]
        lines.append(f"- α: mean {alpha['mean']:.4f}, std {alpha['std']:.4f}, "
                     f"min {alpha['min']:.4f}, max {alpha['max']:.4f} over {alpha['count']} tokens")
    if summary.get("docs"):
        lines.append(f"- validation Data Docs: {summary['docs']}")
    if histogram:
        lines.append(f"- α histogram: {histogram}")
    if summary.get("partition"):
        lines.append(f"- partition: {summary['partition']}")
    markdown = "\n".join(lines)
    create_markdown_artifact(key=f"{dataset}-summary".replace("_", "-"), markdown=markdown,
                             description=f"Summary of run {run_id}")
    return markdown
