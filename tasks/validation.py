"""Great Expectations suites over generated rows, per shard and per dataset.

Rows go to GX as pandas frames (GX 1.24 cannot validate DuckDB tables through its SQL
route). Derived columns turn per-row array checks into plain column expectations. The GX
file context is shared by every run of every dataset, so one validation uses it at a time.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from sampler.soft_targets import SOFT_TARGET_COLUMNS
from tasks.atomic_files import write_text_atomically
from tasks.config import DatasetConfig
from tasks.layout import DataDir
from tasks.locking import exclusive

logger = logging.getLogger(__name__)

ALLOWED_FINISH_REASONS = ["stop", "length"]
PER_TOKEN_COLUMNS = ("alpha", "log_q", "log_teacher", "log_theta")
#: Token id lists: checked here through derived columns, never handed to GX whole.
ID_COLUMNS = ("token_ids", "teacher_prompt_ids", "theta_prompt_ids")


@dataclass(frozen=True)
class ValidationOutcome:
    success: bool
    failed_expectations: list[str]
    result_path: str
    docs_path: str | None


def _rows_with_nonfinite_or_positive(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    """Per row: whether any log-probability in its list is NaN, infinite or above 0."""
    lists = column.combine_chunks()
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    bad = np.zeros(rows, dtype=bool)
    bad[parents[~(np.isfinite(values) & (values <= 1e-6))]] = True
    return bad


def _soft_target_tokens_ok(lists: pa.ListArray, k: int, ids: bool) -> np.ndarray:
    """Per token of one soft-target column: k entries; ids non-negative and distinct, or
    log-probs finite, ≤ 0 and most likely first (the recorded top-k is sorted descending, and
    rounding to float32 keeps that order)."""
    lengths = pc.fill_null(pc.list_value_length(lists), -1).to_numpy(zero_copy_only=False)
    ok = lengths == k
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    whole = ok[pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)]
    block = values[whole].reshape(-1, k)
    if ids:
        ordered = np.sort(block, axis=1)
        sound = (block >= 0).all(axis=1) & (np.diff(ordered, axis=1) != 0).all(axis=1)
    else:
        sound = ((np.isfinite(block) & (block <= 1e-6)).all(axis=1)
                 & (np.diff(block, axis=1) <= 0).all(axis=1))
    ok[np.flatnonzero(ok)] = sound
    return ok


def soft_targets_well_formed(table: pa.Table, k: int) -> np.ndarray:
    """Per row: each soft-target column present with one list of k per generated token, each
    sound (`_soft_target_tokens_ok`). The upper bound of the ids (the shared vocabulary) is
    not known here."""
    rows = table.num_rows
    if not set(SOFT_TARGET_COLUMNS) <= set(table.column_names):
        return np.zeros(rows, dtype=bool)
    ok = np.ones(rows, dtype=bool)
    for name in SOFT_TARGET_COLUMNS:
        per_row = table[name].combine_chunks()
        same = pc.equal(pc.list_value_length(per_row), table["num_tokens"].combine_chunks())
        ok &= pc.fill_null(same, False).to_numpy(zero_copy_only=False)
        tokens_ok = _soft_target_tokens_ok(pc.list_flatten(per_row), k, name.endswith("_ids"))
        token_rows = pc.list_parent_indices(per_row).to_numpy(zero_copy_only=False)
        ok[token_rows[~tokens_ok]] = False
    return ok


def validation_frame(table: pa.Table, top_logprobs: int = 0) -> pd.DataFrame:
    """Rows with the derived columns the expectations read (array checks done columnwise);
    with `top_logprobs` (k) on, whether each row's soft targets are well formed."""
    rows = table.num_rows
    lengths_match = np.ones(rows, dtype=bool)
    for column in (*PER_TOKEN_COLUMNS, "token_ids"):
        same = pc.equal(pc.list_value_length(table[column]), table["num_tokens"])
        lengths_match &= pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    bad_logprobs = np.zeros(rows, dtype=bool)
    for column in PER_TOKEN_COLUMNS[1:]:
        bad_logprobs |= _rows_with_nonfinite_or_positive(table[column], rows)
    has_prompt_ids = np.ones(rows, dtype=bool)
    for column in ("teacher_prompt_ids", "theta_prompt_ids"):
        present = pc.greater(pc.list_value_length(table[column]), 0)
        has_prompt_ids &= pc.fill_null(present, False).to_numpy(zero_copy_only=False)
    soft_targets = [name for name in SOFT_TARGET_COLUMNS if name in table.column_names]
    frame = table.drop_columns([*PER_TOKEN_COLUMNS, *ID_COLUMNS, *soft_targets]).to_pandas()
    frame["row_key"] = (frame["prompt_id"] + "#" + frame["sample_round"] + "#"
                        + frame["sample_index"].astype(str))
    frame["arrays_match_num_tokens"] = lengths_match
    frame["logprobs_finite_and_nonpositive"] = ~bad_logprobs
    frame["hit_max_tokens"] = (frame["finish_reason"] == "length").astype(float)
    frame["has_text"] = frame["completion_text"].fillna("").str.len() > 0
    frame["has_prompt_ids"] = has_prompt_ids
    if top_logprobs:
        frame["soft_targets_well_formed"] = soft_targets_well_formed(table, top_logprobs)
    return frame


def shard_expectations(config: DatasetConfig) -> list:
    """What every row of every shard must satisfy."""
    e = gx.expectations
    sampling = config.sampling
    alpha_range = {"min_value": sampling.alpha_min - 1e-6, "max_value": sampling.alpha_max + 1e-6}
    soft_targets = ([e.ExpectColumnValuesToBeInSet(column="soft_targets_well_formed",
                                                   value_set=[True])]
                    if sampling.top_logprobs else [])
    return [
        e.ExpectColumnValuesToNotBeNull(column="completion_text"),
        e.ExpectColumnValuesToBeInSet(column="has_text", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="has_prompt_ids", value_set=[True]),
        e.ExpectColumnValuesToBeBetween(column="num_tokens", min_value=1,
                                        max_value=sampling.max_tokens),
        e.ExpectColumnValuesToBeInSet(column="finish_reason", value_set=ALLOWED_FINISH_REASONS),
        e.ExpectColumnValuesToBeBetween(column="alpha_mean", **alpha_range),
        e.ExpectColumnValuesToBeBetween(column="alpha_min", **alpha_range),
        e.ExpectColumnValuesToBeBetween(column="alpha_max", **alpha_range),
        e.ExpectColumnValuesToBeInSet(column="arrays_match_num_tokens", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="logprobs_finite_and_nonpositive", value_set=[True]),
        e.ExpectColumnValuesToBeUnique(column="row_key"),
        *soft_targets,
    ]


def dataset_expectations(config: DatasetConfig) -> list:
    """The dataset's own thresholds, over all rows of the run."""
    e = gx.expectations
    return [
        e.ExpectTableRowCountToBeBetween(min_value=config.validation.min_rows),
        e.ExpectColumnValuesToBeUnique(column="row_key"),
        e.ExpectColumnMeanToBeBetween(column="hit_max_tokens", min_value=0.0,
                                      max_value=config.validation.max_length_finish_share),
    ]


def run_suite(data: DataDir, name: str, result_path: Path, expectations: list,
              frame: pd.DataFrame) -> ValidationOutcome:
    """Validate `frame` with suite `name` in a checkpoint; keep the result JSON at
    `result_path`. The Data Docs are rendered once per run (`build_validation_docs`)."""
    with exclusive(data.locks / "gx.lock"):
        return _run_suite(data.gx, name, result_path, expectations, frame)


def _run_suite(gx_root: Path, name: str, result_path: Path, expectations: list,
               frame: pd.DataFrame) -> ValidationOutcome:
    context = gx.get_context(mode="file", project_root_dir=str(gx_root))
    source = context.data_sources.add_or_update_pandas("generated")
    try:
        asset = source.get_asset(name)
    except LookupError:
        asset = source.add_dataframe_asset(name)
    try:
        batch = asset.get_batch_definition("all-rows")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("all-rows")
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[definition], actions=[],
        result_format={"result_format": "SUMMARY"}))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    validation = next(iter(result.run_results.values()))
    failed = [f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column', '')})"
              for r in validation.results if not r.success]
    write_text_atomically(json.dumps(validation.to_json_dict(), default=_json_default, indent=1),
                          result_path, "validation-result")
    docs = context.get_docs_sites_urls(only_if_exists=False)     # rendered at the run's end
    docs_path = docs[0]["site_url"] if docs else None
    return ValidationOutcome(bool(result.success), failed, str(result_path), docs_path)


def suite_summary(outcome: ValidationOutcome) -> dict[str, object]:
    """Success, expectations evaluated and passed, and the failed ones, from the result JSON."""
    statistics = json.loads(Path(outcome.result_path).read_text()).get("statistics", {})
    return {"success": outcome.success, "failed": outcome.failed_expectations,
            "evaluated": statistics.get("evaluated_expectations"),
            "successful": statistics.get("successful_expectations")}


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


@task(name="validate-shard")
def validate_shard(table: pa.Table, config: DatasetConfig, data: DataDir, run_id: str,
                   shard_key: str) -> ValidationOutcome:
    outcome = run_suite(data, f"{config.name}-shard",
                        data.validation(run_id) / f"shard-{shard_key}.json",
                        shard_expectations(config),
                        validation_frame(table, config.sampling.top_logprobs))
    logger.info("shard %s validation: %s %s", shard_key, "passed" if outcome.success else
                "FAILED", outcome.failed_expectations)
    return outcome


@task(name="validate-dataset")
def validate_dataset(table: pa.Table, config: DatasetConfig, data: DataDir, run_id: str
                     ) -> ValidationOutcome:
    outcome = run_suite(data, f"{config.name}-dataset", data.validation(run_id) / "dataset.json",
                        dataset_expectations(config), validation_frame(table))
    logger.info("dataset validation: %s %s", "passed" if outcome.success else "FAILED",
                outcome.failed_expectations)
    return outcome


@task(name="build-validation-docs")
def build_validation_docs(data: DataDir) -> None:
    """Render the Data Docs once, after a run's last validation: rendering reads every result
    stored so far, which per shard took three quarters of a shard's validation and grew with
    every run. The docs are a view of the result JSON: a failure to render them is logged and
    does not fail the run."""
    try:
        with exclusive(data.locks / "gx.lock"):
            gx.get_context(mode="file", project_root_dir=str(data.gx)).build_data_docs()
    except Exception as error:  # noqa: BLE001 - the results are kept; only their view is stale
        logger.warning("validation Data Docs not rendered: %s: %s", type(error).__name__, error)
