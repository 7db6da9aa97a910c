"""Curated rows with lineage, published as one Parquet file per (dataset, generation,
run date) partition; each sample is in exactly one partition (see tasks/planning.py).

Publishing replaces exactly its own partition: the file is written beside the target and
renamed over it, so readers see the old partition or the new one, never a mix, and the
neighbouring partitions are never touched (unlike DuckDB's COPY ... OVERWRITE). The file's
metadata holds the generation's resolved settings and its card's facts, so it describes itself
without the catalog; its dataset card (README.md, tasks/dataset_card.py) lies beside it, so
`datasets.load_dataset(<partition folder>)` opens it as is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from tasks.answer_checks import ANSWER_CHECKS
from tasks.atomic_files import write_atomically, write_text_atomically
from tasks.config import DatasetConfig
from tasks.dataset_card import (CARD_KEY, GENERATION_KEY, CardPart, PartitionFacts,
                                chat_template_of, render_card)
from tasks.ledger import RunLedger, now
from tasks.lineage import local_checkpoint
from tasks.planning import FIRST_ROUND
from tasks.settling import SettledShard, run_problems
from tasks.staging import StagedPrompt
from tasks.training_columns import add_training_columns
from tasks.validation import ValidationOutcome, suite_summary, validate_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curated:
    """The rows to publish and how many curation left out, for the card."""

    table: pa.Table
    left_out_truncated: int     # stopped at max_tokens, with curation.keep_truncated off
    left_out_answer: int        # rejected by the dataset's answer check


def curate(table: pa.Table, config: DatasetConfig, reference_answers: dict[str, str],
           lineage: dict[str, object]) -> Curated:
    """Leave out what the dataset's curation says, then add the training columns and the
    lineage columns to every row."""
    curation = config.curation
    truncated = pc.fill_null(pc.equal(table["finish_reason"], "length"), False)
    left_out_truncated = 0
    if not curation.keep_truncated:
        left_out_truncated = pc.sum(truncated).as_py() or 0
        table = table.filter(pc.invert(truncated))
    left_out_answer = 0
    if curation.answer_check:
        check = ANSWER_CHECKS[curation.answer_check]
        correct = [check(text, reference_answers.get(prompt_id)) for text, prompt_id in
                   zip(table["completion_text"].to_pylist(), table["prompt_id"].to_pylist())]
        table = table.append_column("answer_correct", pa.array(correct, pa.bool_()))
        left_out_answer = correct.count(False)
        table = table.filter(pc.field("answer_correct"))
    table = add_training_columns(table, config.prompts)
    rows = table.num_rows
    for name, value in lineage.items():
        table = table.append_column(name, pa.array([value] * rows))
    return Curated(table, left_out_truncated, left_out_answer)


def publish_partition(table: pa.Table, path: Path, generation_settings: str,
                      facts: PartitionFacts) -> None:
    """Atomically replace one partition's file, then its dataset card beside it (README.md);
    other partitions are untouched. The card's facts are in the file's metadata too, so a
    crash between the two writes leaves a partition whose card the rerun rewrites."""
    metadata = {**(table.schema.metadata or {}), GENERATION_KEY: generation_settings,
                CARD_KEY: facts.to_json()}
    write_atomically(table.replace_schema_metadata(metadata), path, "publish")
    card = render_card([CardPart(facts, json.loads(generation_settings))], table,
                       [path.name], [facts.reproduce])
    write_text_atomically(card, path.with_name("README.md"), "publish-card")


def validation_summary(settled: list[SettledShard], overall: ValidationOutcome
                       ) -> dict[str, object]:
    """Shard outcomes and the dataset suite's result, as the card reports them."""
    statuses = [s.status for s in settled]
    return {"shards_passed": sum(s.passed is not None for s in settled),
            "shards_quarantined": statuses.count("quarantined"),
            "shards_failed": statuses.count("failed"), "dataset_suite": suite_summary(overall)}


def partition_facts(config: DatasetConfig, ledger: RunLedger, curated: Curated, generated: int,
                    validation: dict[str, object], shard_size: int) -> PartitionFacts:
    """What the partition's card says beyond its rows (kept in its Parquet metadata)."""
    generation = ledger.generation
    return PartitionFacts(
        dataset=config.name, description=config.description,
        run_date=ledger.run_date.isoformat(), generation=generation.key,
        published_run_id=ledger.run_id,
        counts={"generated": generated, "left_out_truncated": curated.left_out_truncated,
                "left_out_answer": curated.left_out_answer,
                "published": curated.table.num_rows},
        validation=validation, curation=config.curation.model_dump(),
        card=config.card.model_dump(),
        chat_templates={role: chat_template_of(local_checkpoint(checkpoint.path))
                        for role, checkpoint in (("teacher", generation.teacher),
                                                 ("theta", generation.theta))},
        reproduce=(f"python -m flows.distill --dataset {config.name} "
                   f"--run-date {ledger.run_date.isoformat()} --shard-size {shard_size}"))


@dataclass(frozen=True)
class Publication:
    partition: str | None
    rows: int
    generated: pa.Table | None        # the validated rows behind it, before curation
    problems: list[str]


@task(name="publish-partition")
def publish_passed(settled: list[SettledShard], prompts: list[StagedPrompt],
                   config: DatasetConfig, ledger: RunLedger, shard_size: int) -> Publication:
    """Publish the shards that passed as this date's partition, unless a gate says no.
    `shard_size` goes into the card's reproduce command: shards (and so seeds) depend on it.

    A date with nothing new (every prompt's first samples are published elsewhere, no
    samples_per_run) publishes nothing and has no problem.
    """
    problems = run_problems(settled)
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
    reference = config.curation.reference_column
    curated = curate(generated, config,
                     {p.prompt_id: p.fields.get(reference) for p in prompts} if reference else {},
                     {"published_run_id": ledger.run_id, "published_at": now(),
                      "alpha_method": sampling.alpha_method,
                      "alpha_min_config": sampling.alpha_min,
                      "alpha_max_config": sampling.alpha_max})
    path = ledger.data.partition(config.name, ledger.generation.key, ledger.run_date)
    facts = partition_facts(config, ledger, curated, generated.num_rows,
                            validation_summary(settled, overall), shard_size)
    publish_partition(curated.table, path, ledger.generation.published_settings, facts)
    ledger.mark_published([p.version for s in passed if s.shard.sample_round == FIRST_ROUND
                           for p in s.shard.prompts])
    ledger.refresh_views()
    logger.info("published %d rows to %s (left out: %d truncated, %d by the answer check)",
                curated.table.num_rows, path, curated.left_out_truncated,
                curated.left_out_answer)
    return Publication(str(path), curated.table.num_rows, generated, problems)
