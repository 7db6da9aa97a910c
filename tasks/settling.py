"""Settle each generated shard: record the rows the model refused as rejects, validate the
rest, quarantine a shard that fails, and record the outcome in the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.atomic_files import make_folders, replace_durably
from tasks.config import DatasetConfig
from tasks.generation import ShardOutcome
from tasks.ledger import RunLedger
from tasks.planning import Shard
from tasks.validation import ValidationOutcome, validate_shard


@dataclass(frozen=True)
class SettledShard:
    shard: Shard
    status: str                       # generated, reused, quarantined or failed
    rows: int                         # rows kept (refused rows are rejects, not rows)
    passed: pa.Table | None           # the rows to publish, when the shard passed
    validation: ValidationOutcome | None
    problem: str | None               # why it is not published
    cause: str | None = None          # a failed shard's error, without the shard's name

    def table_row(self) -> dict[str, object]:
        """One line of the run's shard table artifact."""
        if self.validation is None:
            verdict = self.problem
        elif self.validation.success:
            verdict = "passed"
        else:
            verdict = "; ".join(self.validation.failed_expectations)
        return {"shard": self.shard.index, "key": self.shard.key,
                "round": self.shard.sample_round, "prompts": len(self.shard.prompts),
                "status": self.status, "rows": self.rows, "validation": verdict}


def quarantine(path: Path, ledger: RunLedger) -> Path:
    """Move a shard that failed validation out of the way, beside this run's other failures."""
    target = ledger.data.quarantined(ledger.config.name, ledger.run_id, path.name)
    make_folders(target.parent)
    replace_durably(path, target)
    return target


def settle_shard(shard: Shard, outcome: ShardOutcome | BaseException, config: DatasetConfig,
                 ledger: RunLedger) -> SettledShard:
    """Check a shard's generation (or its failure), and record the outcome."""
    if isinstance(outcome, BaseException):
        cause = str(outcome)[:2000]
        settled = SettledShard(shard, "failed", 0, None, None,
                               f"shard {shard.index} failed: {cause}", cause)
    else:
        settled = check_shard(outcome, config, ledger)
    ledger.record_shard(index=shard.index, key=shard.key, sample_round=shard.sample_round,
                        prompts=len(shard.prompts), status=settled.status, rows=settled.rows,
                        validation=settled.validation, error=settled.problem)
    return settled


def run_problems(settled: list[SettledShard]) -> list[str]:
    """The shards' problems for the run's message, each failure cause once with the shards it
    hit: a pair that cannot be built fails every shard with the same error."""
    shards_by_cause: dict[str, list[int]] = {}
    for item in settled:
        if item.status == "failed":
            shards_by_cause.setdefault(item.cause or "", []).append(item.shard.index)
    problems = [f"shard{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))} "
                f"failed: {cause}" for cause, indices in shards_by_cause.items()]
    return problems + [item.problem for item in settled
                       if item.problem and item.status != "failed"]


def check_shard(outcome: ShardOutcome, config: DatasetConfig, ledger: RunLedger
                ) -> SettledShard:
    """Record the rows the model refused as rejects; validate the rest; quarantine a shard
    that fails."""
    shard = outcome.shard
    table = pq.read_table(outcome.path)
    refused = table.filter(pc.equal(table["finish_reason"], "rejected"))
    table = table.filter(pc.not_equal(table["finish_reason"], "rejected"))
    ledger.record_rejects("generate", [{"prompt_id": p, "reason": e} for p, e in
                                       zip(refused["prompt_id"].to_pylist(),
                                           refused["error"].to_pylist())])
    validation = validate_shard(table, config, ledger.data, ledger.run_id, shard.key)
    if validation.success:
        status = "reused" if outcome.reused else "generated"
        return SettledShard(shard, status, table.num_rows, table, validation, None)
    moved = quarantine(Path(outcome.path), ledger)
    return SettledShard(shard, "quarantined", table.num_rows, None, validation,
                        f"shard {shard.index} quarantined at {moved}: failed "
                        f"{', '.join(validation.failed_expectations)}")
