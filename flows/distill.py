"""The distillation flow: stage → shard → generate → validate → curate and publish → report.

    python -m flows.distill --dataset demo

A rerun of the same dataset and date reuses finished shards (keyed by content and config),
redoes missing or failed ones, and replaces exactly that date's partition.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import date, datetime, UTC
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import REPO_ROOT, load_dataset_config
from tasks.atomic_files import remove_stale_temporaries
from tasks.generation import check_model_paths, generate_shard, plan_shards
from tasks.locking import run_lock
from tasks.publishing import code_version, publish
from tasks.reporting import report_run
from tasks.sql import query
from tasks.sql import warehouse as open_warehouse
from tasks.staging import record_rejects, stage_prompts
from tasks.validation import validate_dataset, validate_shard

DEFAULT_DATA_DIR = Path(os.environ.get("DISTILL_DATA_DIR", REPO_ROOT / "data"))


class RunFailed(RuntimeError):
    """The run finished but some shard or check failed; what passed was still published."""


@dataclass
class RunSummary:
    run_id: str
    dataset: str
    run_date: str
    status: str
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


def _record(warehouse: Path, name: str, **values) -> None:
    with open_warehouse(warehouse) as connection:
        connection.execute(query(name), values)


def _quarantine(path: Path, data_dir: Path, dataset: str) -> Path:
    target = data_dir / "quarantine" / dataset / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=4))
def distill(dataset: str = "demo", run_date: date | None = None, shard_size: int = 64,
            data_dir: str | None = None, lock_wait_seconds: float = 0.0) -> dict:
    """Generate, validate and publish one dataset's partition for `run_date` (default today).

    A second run of the same dataset and date waits up to `lock_wait_seconds` for the first,
    then is refused (`RunLocked`).
    """
    config = load_dataset_config(dataset)
    check_model_paths(config)
    run_date = run_date or date.today()
    root = Path(data_dir or DEFAULT_DATA_DIR).resolve()
    with run_lock(root, config.name, run_date, lock_wait_seconds):
        return _run(config, run_date, root, shard_size)


def _run(config, run_date: date, root: Path, shard_size: int) -> dict:
    """The body of `distill`, run while holding the (dataset, date) lock."""
    logger = get_run_logger()
    for folder in (root / "shards", root / "published"):
        if folder.exists() and (removed := remove_stale_temporaries(folder)):
            logger.info("removed %d temporary files left by crashed writers", removed)
    warehouse = root / "catalog.duckdb"
    flow_run_id = str(flow_run.get_id() or "local")
    run_id = f"{config.name}-{run_date.isoformat()}-{flow_run_id[:8]}"
    started = datetime.now(UTC).replace(tzinfo=None)
    run_row = dict(run_id=run_id, dataset=config.name, run_date=run_date, flow_run_id=flow_run_id,
                   config_hash=config.config_hash(), generation_hash=config.generation_hash(),
                   code_version=code_version(), started_at=started)
    _record(warehouse, "mark_crashed", dataset=config.name, run_date=run_date)
    _record(warehouse, "record_run", **run_row, status="running", rows_published=None,
            message=None, finished_at=None)
    try:
        return _generate_and_publish(config, run_date, root, shard_size, run_id, run_row)
    except RunFailed:
        raise
    except Exception as error:
        _record(warehouse, "record_run", **run_row, status="failed", rows_published=0,
                message=f"{type(error).__name__}: {error}"[:2000],
                finished_at=datetime.now(UTC).replace(tzinfo=None))
        raise


def _generate_and_publish(config, run_date: date, root: Path, shard_size: int, run_id: str,
                          run_row: dict) -> dict:
    """Stage, generate, validate, publish and report; raises RunFailed if anything failed."""
    logger = get_run_logger()
    warehouse = root / "catalog.duckdb"
    flow_run_id = run_row["flow_run_id"]
    prompts = stage_prompts(str(warehouse), config, run_id)
    shards = plan_shards(prompts, config, shard_size)
    logger.info("%d prompts in %d shards of up to %d", len(prompts), len(shards), shard_size)
    futures = generate_shard.map(shards, config=unmapped(config), data_dir=unmapped(str(root)))
    progress = create_progress_artifact(0.0, description=f"Shards of {run_id} generated")
    for done, _ in enumerate(as_completed(futures), start=1):
        update_progress_artifact(progress, 100.0 * done / max(len(shards), 1))

    problems, passed_tables, shard_rows = [], [], []
    counts = {"ok": 0, "reused": 0, "quarantined": 0, "failed": 0}
    docs = None
    for shard, future in zip(shards, futures):
        row = {"shard": shard.index, "key": shard.key, "prompts": len(shard.prompts)}
        try:
            outcome = future.result()
        except Exception as error:  # noqa: BLE001 - reported per shard, the others go on
            counts["failed"] += 1
            problems.append(f"shard {shard.index} failed: {error}")
            _record(warehouse, "record_shard", run_id=run_id, dataset=config.name,
                    shard_index=shard.index, shard_key=shard.key, prompts=len(shard.prompts),
                    rows=None, status="failed", validated=None, failed_expectations=None,
                    result_path=None, error=str(error)[:2000])
            shard_rows.append({**row, "status": "failed", "rows": 0, "validation": str(error)})
            continue
        table = pq.read_table(outcome.path)
        refused = table.filter(pc.equal(table["finish_reason"], "rejected"))
        table = table.filter(pc.not_equal(table["finish_reason"], "rejected"))
        if refused.num_rows and not outcome.reused:
            record_rejects_for(warehouse, config.name, run_id, refused)
        validation = validate_shard(table, config, str(root), run_id, shard.key)
        docs = validation.docs_path
        status = "reused" if outcome.reused else "generated"
        if not validation.success:
            status = "quarantined"
            counts["quarantined"] += 1
            moved = _quarantine(Path(outcome.path), root, config.name)
            problems.append(f"shard {shard.index} quarantined at {moved}: failed "
                            f"{', '.join(validation.failed_expectations)}")
        else:
            counts["ok"] += 1
            counts["reused"] += outcome.reused
            passed_tables.append(table)
        _record(warehouse, "record_shard", run_id=run_id, dataset=config.name,
                shard_index=shard.index, shard_key=shard.key, prompts=len(shard.prompts),
                rows=table.num_rows, status=status, validated=validation.success,
                failed_expectations=", ".join(validation.failed_expectations) or None,
                result_path=validation.result_path, error=None)
        _record(warehouse, "record_validation", run_id=run_id, dataset=config.name,
                scope="shard", shard_key=shard.key, success=validation.success,
                failed_expectations=", ".join(validation.failed_expectations) or None,
                result_path=validation.result_path, docs_path=validation.docs_path)
        shard_rows.append({**row, "status": status, "rows": table.num_rows,
                           "validation": "passed" if validation.success else
                           "; ".join(validation.failed_expectations)})

    rows_published, partition, alpha, published = 0, None, None, None
    if problems and config.validation.all_or_nothing:
        problems.append("validation.all_or_nothing is set; nothing published")
    elif passed_tables:
        combined = pa.concat_tables(passed_tables)
        overall = validate_dataset(combined, config, str(root), run_id)
        _record(warehouse, "record_validation", run_id=run_id, dataset=config.name,
                scope="dataset", shard_key=None, success=overall.success,
                failed_expectations=", ".join(overall.failed_expectations) or None,
                result_path=overall.result_path, docs_path=overall.docs_path)
        if overall.success:
            answers = {p.prompt_id: p.fields.get("answer", "") for p in prompts}
            lineage = {"run_id": run_id, "flow_run_id": flow_run_id,
                       "teacher_model": config.models.teacher, "theta_model": config.models.theta,
                       "alpha_method": config.sampling.alpha_method,
                       "alpha_min_config": config.sampling.alpha_min,
                       "alpha_max_config": config.sampling.alpha_max,
                       "config_hash": config.config_hash(), "code_version": run_row["code_version"]}
            partition, rows_published = publish(combined, config, str(root), run_date, answers,
                                                lineage)
            published = combined
            every_alpha = pc.list_flatten(combined["alpha"]).to_numpy().astype(float)
            alpha = {"mean": float(every_alpha.mean()), "std": float(every_alpha.std()),
                     "min": float(every_alpha.min()), "max": float(every_alpha.max()),
                     "count": int(every_alpha.size)}
        else:
            problems.append("dataset validation failed: "
                            + ", ".join(overall.failed_expectations) + "; nothing published")
    elif not problems:
        problems.append("no prompt to generate; nothing published")
    else:
        problems.append("no shard passed; nothing published")

    status = "published" if not problems else ("partial" if rows_published else "failed")
    rejected = _count_rejects(warehouse, run_id)
    summary = RunSummary(run_id=run_id, dataset=config.name, run_date=run_date.isoformat(),
                         status=status, rows_published=rows_published, shards_ok=counts["ok"],
                         shards_reused=counts["reused"], shards_quarantined=counts["quarantined"],
                         shards_failed=counts["failed"], rejected_rows=rejected,
                         partition=partition, catalog=str(warehouse), docs=docs, alpha=alpha,
                         problems=problems)
    _record(warehouse, "record_run", **run_row, status=status, rows_published=rows_published,
            message="; ".join(problems) or None,
            finished_at=datetime.now(UTC).replace(tzinfo=None))
    report_run(config.name, run_id, shard_rows, asdict(summary), published,
               str(root / "reports" / run_id))
    if problems:
        raise RunFailed(f"run {run_id}: " + " | ".join(problems))
    return asdict(summary)


def record_rejects_for(warehouse: Path, dataset: str, run_id: str, refused: pa.Table) -> None:
    with open_warehouse(warehouse) as connection:
        record_rejects(connection, dataset, run_id, "generate",
                       [{"prompt_id": p, "reason": e} for p, e in
                        zip(refused["prompt_id"].to_pylist(), refused["error"].to_pylist())])


def _count_rejects(warehouse: Path, run_id: str) -> int:
    with open_warehouse(warehouse) as connection:
        return connection.execute(query("count_rejects"), {"run_id": run_id}).fetchone()[0]


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
