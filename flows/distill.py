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

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from sampler.errors import ConfigError, IncompatibleModelsError
from tasks.atomic_files import remove_stale_temporaries
from tasks.config import REPO_ROOT, DatasetConfig, load_dataset_config
from tasks.fan_out import generate_on_workers
from tasks.generation import check_models, generate_in_process, resolve_models
from tasks.layout import DataDir
from tasks.ledger import RunLedger, record_refused_run
from tasks.lineage import describe_generation
from tasks.locking import run_lock
from tasks.planning import plan_shards
from tasks.publishing import publish_passed
from tasks.reporting import report_run, summarize
from tasks.settling import settle_shard
from tasks.staging import stage_prompts
from tasks.validation import build_validation_docs

DEFAULT_DATA_DIR = Path(os.environ.get("DISTILL_DATA_DIR", REPO_ROOT / "data"))


class RunFailed(RuntimeError):
    """The run finished but some shard or check failed; what passed was still published."""


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=4))
def distill(dataset: str = "demo", run_date: date | None = None, shard_size: int = 64,
            data_dir: str | None = None, lock_wait_seconds: float = 0.0,
            fan_out: str | None = None, workers: int | None = None) -> dict:
    """Generate, validate and publish one dataset's partition for `run_date` (default today).

    A second run of the same dataset and date waits up to `lock_wait_seconds` for the first,
    then is refused (`RunLocked`). With `fan_out` (a deployment of flows/shard_worker.py, e.g.
    "generate-shards/gpu") the shards go to that deployment's GPU workers, in `workers` shares
    (default: one per worker online); otherwise they are generated in this process.
    `dataset` names a file in flows/datasets/; a run not started from a deployment (the
    command line) may give a path to a YAML file instead.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers: {workers}; give at least 1, or none for one per worker online")
    if shard_size < 1:
        raise ValueError(f"shard_size: {shard_size}; give at least 1 prompt per shard")
    run_date = run_date or date.today()
    data = DataDir(Path(data_dir or DEFAULT_DATA_DIR).resolve())
    flow_run_id = str(flow_run.get_id() or "local")
    try:
        config = load_dataset_config(dataset, allow_path=deployment.get_id() is None)
    except ConfigError as error:
        try:
            record_refused_run(data, dataset, run_date, flow_run_id,
                               f"{type(error).__name__}: {error}")
        except Exception:  # noqa: BLE001 - the config error is the one to report
            get_run_logger().exception("could not record the refused run in the catalog")
        raise
    with run_lock(data.root, config.name, run_date, lock_wait_seconds):
        return _run(config, run_date, data, shard_size, fan_out, workers, flow_run_id)


def _run(config: DatasetConfig, run_date: date, data: DataDir, shard_size: int,
         fan_out: str | None, workers: int | None, flow_run_id: str) -> dict:
    """The five steps, run while holding the (dataset, date) lock; the ledger records them."""
    if removed := remove_stale_temporaries(data.shards, data.published, data.work,
                                           data.validations):
        get_run_logger().info("removed %d temporary files left by crashed writers", removed)
    ledger = RunLedger(data, config, run_date, flow_run_id)
    with ledger.failure_recorded():
        model_paths = resolve_models(config)
        try:
            models = check_models(config, model_paths)
        except IncompatibleModelsError as error:
            raise RunFailed(f"run {ledger.run_id}: {error}") from error
        ledger.begin(describe_generation(config, model_paths))
        prompts = stage_prompts(ledger, config, models)
        shards = plan_shards(ledger, prompts, config, shard_size)
        if fan_out:
            outcomes = generate_on_workers(shards, config, ledger.generation, ledger.run_id,
                                           data, fan_out, workers)
        else:
            outcomes = generate_in_process(shards, config, ledger.generation, ledger.run_id,
                                           data)
        settled = [settle_shard(s, o, config, ledger) for s, o in zip(shards, outcomes)]
        publication = publish_passed(settled, prompts, config, ledger, shard_size)
        if any(s.validation is not None for s in settled):
            build_validation_docs(data)
        summary = summarize(ledger, settled, publication)
        ledger.finish(summary.status, summary.rows_published,
                      "; ".join(summary.problems) or None)
        report_run(summary, settled, publication.generated, data.reports(ledger.run_id))
    if summary.problems:
        raise RunFailed(f"run {ledger.run_id}: " + " | ".join(summary.problems))
    return asdict(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the distillation flow for one dataset.")
    parser.add_argument("--dataset", default="demo",
                        help="a dataset name, the file flows/datasets/<name>.yaml, or a path "
                             "to a dataset YAML (command line only: a deployment run takes "
                             "names only)")
    parser.add_argument("--run-date", type=date.fromisoformat, default=None)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--lock-wait-seconds", type=float, default=0.0)
    parser.add_argument("--fan-out", default=None,
                        help="deployment of flows/shard_worker.py whose GPU workers generate")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    result = distill(dataset=args.dataset, run_date=args.run_date, shard_size=args.shard_size,
                     data_dir=args.data_dir, lock_wait_seconds=args.lock_wait_seconds,
                     fan_out=args.fan_out, workers=args.workers)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
