"""What a run tells people: its summary, Prefect artifacts (shard table, markdown) and an α
histogram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.ledger import RunLedger
from tasks.planning import FIRST_ROUND
from tasks.publishing import Publication
from tasks.settling import SettledShard
from tasks.training_columns import token_values


@dataclass
class RunSummary:
    run_id: str
    dataset: str
    run_date: str
    generation: str
    status: str                # published, up_to_date (nothing new), partial or failed
    new_prompts: int           # prompt versions whose first samples this date generated
    rows_published: int
    shards_ok: int
    shards_reused: int
    shards_quarantined: int
    shards_failed: int
    rejected_rows: int
    partition: str | None
    catalog: str
    docs: str | None
    alpha: dict | None
    problems: list[str]


def alpha_stats(table: pa.Table | None) -> dict | None:
    """Mean, spread and range of every generated token's α."""
    if table is None or not table.num_rows:
        return None
    every = token_values(table["alpha"])
    return {"mean": float(every.mean()), "std": float(every.std()), "min": float(every.min()),
            "max": float(every.max()), "count": int(every.size)}


def summarize(ledger: RunLedger, settled: list[SettledShard], publication: Publication
              ) -> RunSummary:
    """The run's outcome in numbers; its status follows from its problems."""
    statuses = [s.status for s in settled]
    if publication.problems:
        status = "partial" if publication.rows else "failed"
    else:
        status = "published" if publication.partition else "up_to_date"
    docs = [s.validation.docs_path for s in settled if s.validation is not None]
    return RunSummary(
        run_id=ledger.run_id, dataset=ledger.config.name, run_date=ledger.run_date.isoformat(),
        generation=ledger.generation.key, status=status,
        new_prompts=sum(len(s.shard.prompts) for s in settled
                        if s.shard.sample_round == FIRST_ROUND),
        rows_published=publication.rows,
        shards_ok=statuses.count("generated") + statuses.count("reused"),
        shards_reused=statuses.count("reused"), shards_quarantined=statuses.count("quarantined"),
        shards_failed=statuses.count("failed"), rejected_rows=ledger.rejected_count(),
        partition=publication.partition, catalog=str(ledger.data.catalog),
        docs=docs[-1] if docs else None, alpha=alpha_stats(publication.generated),
        problems=publication.problems)


def alpha_histogram(table: pa.Table, dataset: str, path: Path) -> Path | None:
    """PNG histogram of every generated token's α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = token_values(table["alpha"])
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
def report_run(run: RunSummary, settled: list[SettledShard], generated: pa.Table | None,
               report_dir: Path) -> str:
    """Publish the shard table and a markdown summary as artifacts of this flow run."""
    create_table_artifact(key=f"{run.dataset}-shards".replace("_", "-"),
                          table=[s.table_row() for s in settled],
                          description=f"Shards of run {run.run_id}")
    histogram = None
    if generated is not None and generated.num_rows:
        histogram = alpha_histogram(generated, run.dataset, report_dir / "alpha_hist.png")
    lines = [f"# Run {run.run_id}", "", f"- dataset: **{run.dataset}**",
             f"- generation: `{run.generation}`", f"- status: **{run.status}**",
             f"- new prompts: {run.new_prompts}", f"- rows published: {run.rows_published}",
             f"- shards: {run.shards_ok} ok, {run.shards_quarantined} quarantined, "
             f"{run.shards_failed} failed ({run.shards_reused} reused)",
             f"- rejected rows: {run.rejected_rows}"]
    if run.alpha:
        alpha = run.alpha
        lines.append(f"- α: mean {alpha['mean']:.4f}, std {alpha['std']:.4f}, "
                     f"min {alpha['min']:.4f}, max {alpha['max']:.4f} over {alpha['count']} tokens")
    if run.docs:
        lines.append(f"- validation Data Docs: {run.docs}")
    if histogram:
        lines.append(f"- α histogram: {histogram}")
    if run.partition:
        lines.append(f"- partition: {run.partition}")
    markdown = "\n".join(lines)
    create_markdown_artifact(key=f"{run.dataset}-summary".replace("_", "-"), markdown=markdown,
                             description=f"Summary of run {run.run_id}")
    return markdown
