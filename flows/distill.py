"""The distillation flow: stage → shard → generate → validate → curate and publish → report.

    python -m flows.distill --dataset demo

A run for a date generates what is new for that date: the first samples of prompt versions
(new or changed in the source) that no other date of this generation owns, and, with
`samples_per_run`, fresh samples seeded from the date of every prompt that this date or an
earlier one introduced. A rerun of the date reuses its finished shards and republishes the
same rows; a change of generation settings, checkpoints or sampler code makes a new generation
in new partitions (README, "What a run for a date generates").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from datetime import date
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from sampler.errors import IncompatibleModelsError
from tasks.atomic_files import remove_stale_temporaries
from tasks.config import REPO_ROOT, DatasetConfig, load_dataset_config
from tasks.generation import check_models, generate_shard, resolve_models
from tasks.layout import DataDir
from tasks.ledger import RunLedger
from tasks.lineage import describe_generation
from tasks.locking import run_lock
from tasks.planning import plan_shards
from tasks.publishing import publish_passed
from tasks.reporting import report_run, summarize
from tasks.settling import settle_shard
from tasks.staging import stage_prompts

DEFAULT_DATA_DIR = Path(os.environ.get("DISTILL_DATA_DIR", REPO_ROOT / "data"))


class RunFailed(RuntimeError):
    """The run finished but some shard or check failed; what passed was still published."""


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=4))
def distill(dataset: str = "demo", run_date: date | None = None, shard_size: int = 64,
            data_dir: str | None = None, lock_wait_seconds: float = 0.0) -> dict:
    """Generate, validate and publish one dataset's partition for `run_date` (default today).

    A second run of the same dataset and date waits up to `lock_wait_seconds` for the first,
    then is refused (`RunLocked`).
    """
    config = load_dataset_config(dataset)
    run_date = run_date or date.today()
    data = DataDir(Path(data_dir or DEFAULT_DATA_DIR).resolve())
    with run_lock(data.root, config.name, run_date, lock_wait_seconds):
        return _run(config, run_date, data, shard_size)


def _run(config: DatasetConfig, run_date: date, data: DataDir, shard_size: int) -> dict:
    """The five steps, run while holding the (dataset, date) lock; the ledger records them."""
    if removed := remove_stale_temporaries(data.shards, data.published):
        get_run_logger().info("removed %d temporary files left by crashed writers", removed)
    ledger = RunLedger(data, config, run_date, str(flow_run.get_id() or "local"))
    with ledger.failure_recorded():
        try:
            check_models(config, data.root)
        except IncompatibleModelsError as error:
            raise RunFailed(f"run {ledger.run_id}: {error}") from error
        ledger.begin(describe_generation(config, resolve_models(config, data.root)))
        prompts = stage_prompts(ledger, config)
        shards = plan_shards(ledger, prompts, config, shard_size)
        futures = generate_shard.map(shards, config=unmapped(config),
                                     generation=unmapped(ledger.generation),
                                     run_id=unmapped(ledger.run_id), data=unmapped(data))
        _show_progress(futures, ledger.run_id)
        settled = [settle_shard(s, f, config, ledger) for s, f in zip(shards, futures)]
        publication = publish_passed(settled, prompts, config, ledger)
        summary = summarize(ledger, settled, publication)
        ledger.finish(summary.status, summary.rows_published,
                      "; ".join(summary.problems) or None)
        report_run(summary, settled, publication.generated, data.reports(ledger.run_id))
    if summary.problems:
        raise RunFailed(f"run {ledger.run_id}: " + " | ".join(summary.problems))
    return asdict(summary)


def _show_progress(futures: list[PrefectFuture], run_id: str) -> None:
    """A progress artifact that fills as shards finish."""
    progress = create_progress_artifact(0.0, description=f"Shards of {run_id} generated")
    for done, _ in enumerate(as_completed(futures), start=1):
        update_progress_artifact(progress, 100.0 * done / len(futures))


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the distillation flow for one dataset.")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--run-date", type=date.fromisoformat, default=None)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--lock-wait-seconds", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    result = distill(dataset=args.dataset, run_date=args.run_date, shard_size=args.shard_size,
                     data_dir=args.data_dir, lock_wait_seconds=args.lock_wait_seconds)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
