"""Curated rows with lineage, published as one Parquet file per (dataset, generation,
run date) partition; each sample is in exactly one partition (see tasks/planning.py).

Publishing replaces exactly its own partition: the file is written beside the target and
renamed over it, so readers see the old partition or the new one, never a mix, and the
neighbouring partitions are never touched (unlike DuckDB's COPY ... OVERWRITE). The file's
metadata holds the generation's resolved settings, so it describes itself without the catalog.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from tasks.atomic_files import write_atomically
from tasks.config import DatasetConfig
from tasks.ledger import RunLedger, now
from tasks.planning import FIRST_ROUND
from tasks.settling import SettledShard
from tasks.staging import StagedPrompt
from tasks.validation import validate_dataset

logger = logging.getLogger(__name__)

FINAL_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


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


def publish_partition(table: pa.Table, path: Path, generation_settings: str) -> None:
    """Atomically replace one partition's file; other partitions are untouched."""
    metadata = {**(table.schema.metadata or {}), b"distill.generation": generation_settings}
    write_atomically(table.replace_schema_metadata(metadata), path, "publish")


@dataclass(frozen=True)
class Publication:
    partition: str | None
    rows: int
    generated: pa.Table | None        # the validated rows behind it, before curation
    problems: list[str]


@task(name="publish-partition")
def publish_passed(settled: list[SettledShard], prompts: list[StagedPrompt],
                   config: DatasetConfig, ledger: RunLedger) -> Publication:
    """Publish the shards that passed as this date's partition, unless a gate says no.

    A date with nothing new (every prompt's first samples are published elsewhere, no
    samples_per_run) publishes nothing and has no problem.
    """
    problems = [s.problem for s in settled if s.problem]
    passed = [s for s in settled if s.passed is not None]
    if problems and config.validation.all_or_nothing:
        return Publication(None, 0, None,
                           [*problems, "validation.all_or_nothing is set; nothing published"])
    if not passed:
        if not prompts:
            problems.append("no usable prompt in the source; nothing published")
        elif settled:
            problems.append("no shard passed; nothing published")
        return Publication(None, 0, None, problems)
    generated = pa.concat_tables([s.passed for s in passed])
    overall = validate_dataset(generated, config, ledger.data, ledger.run_id)
    ledger.record_dataset_validation(overall)
    if not overall.success:
        return Publication(None, 0, None, [*problems, "dataset validation failed: " +
                                           ", ".join(overall.failed_expectations) +
                                           "; nothing published"])
    sampling = config.sampling
    curated = curate(generated, config, {p.prompt_id: p.fields.get("answer", "") for p in prompts},
                     {"published_run_id": ledger.run_id, "published_at": now(),
                      "alpha_method": sampling.alpha_method,
                      "alpha_min_config": sampling.alpha_min,
                      "alpha_max_config": sampling.alpha_max})
    path = ledger.data.partition(config.name, ledger.generation.key, ledger.run_date)
    publish_partition(curated, path, ledger.generation.settings)
    ledger.mark_published([p.version for s in passed if s.shard.sample_round == FIRST_ROUND
                           for p in s.shard.prompts])
    ledger.refresh_views()
    logger.info("published %d rows to %s", curated.num_rows, path)
    return Publication(str(path), curated.num_rows, generated, problems)
