"""Hostile or mistyped flow parameters and configs: each is refused, naming the field, before
any work; nothing is written outside the data directory and no SQL but the intended runs.

Real Prefect (the test harness's server; a deployment's flow run executed by Prefect's own
engine, as a worker's child process does), real DuckDB files and Parquet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from prefect.testing.utilities import prefect_test_harness

from flows.distill import distill
from sampler.errors import ConfigError
from tasks.config import DATASETS_DIR, REPO_ROOT, load_dataset_config, parse_dataset_config
from tasks.layout import DataDir
from tasks.ledger import RunLedger
from tasks.sql import read_catalog

RUN_DATE = date(2026, 1, 15)


@pytest.fixture(scope="module", autouse=True)
def prefect_backend():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def injection(folder: Path, target: Path) -> str:
    """The issue's `--data-dir`: it closes the view's glob literal and copies to `target`."""
    return (f"{folder}/**/*.parquet', union_by_name=true); COPY (SELECT 42 AS pwned) TO "
            f"'{target}'; SELECT ('")


def publish_one_partition(data: DataDir) -> Path:
    path = data.partition("demo", "g1", RUN_DATE)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "prompt_id": ["p1", "p2"], "content_hash": ["h1", "h2"], "num_tokens": [3, 4],
        "generated_at": pa.array([0, 0], pa.timestamp("us")), "alpha_mean": [0.6, 0.7],
        "alpha_min": [0.5, 0.5], "alpha_max": [0.9, 1.0], "alpha_method": ["kl_symmetry"] * 2,
        "log_importance_weight": [-0.1, -0.2]}), path)
    return path


# Item 1: data_dir is never pasted into SQL.

def test_the_issues_data_dir_injection_is_refused_where_the_data_dir_is_made(tmp_path):
    """The reproduction at the ledger: a data dir whose name closes the view's literal, with a
    published partition below it so that the view's glob finds files."""
    target = tmp_path / "pwned.csv"
    hostile = Path(injection(tmp_path, target))
    with pytest.raises(ConfigError, match=r"^data_dir .*not allowed"):
        data = DataDir(hostile)
        publish_one_partition(data)
        RunLedger(data, load_dataset_config("demo"), RUN_DATE, "local").refresh_views()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("character", ["*", "?", "[", "]", "{", "}", "'", '"', "\n", "\x00",
                                       "\x1b"])
def test_a_data_dir_with_glob_quote_or_control_characters_is_refused(tmp_path, character):
    with pytest.raises(ConfigError, match=r"^data_dir ") as refused:
        DataDir(tmp_path / f"data{character}dir")
    assert f"{character!r} is not allowed" in str(refused.value)


def test_the_issues_command_line_exits_naming_data_dir_and_writes_nothing(tmp_path):
    target = tmp_path / "pwned.csv"
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    finished = subprocess.run(
        [sys.executable, "-m", "flows.distill", "--dataset", "demo", "--data-dir",
         injection(tmp_path, target)],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode != 0
    assert "ConfigError: data_dir " in finished.stderr
    assert "is not allowed in a data directory's path" in finished.stderr
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_with_spaces_and_unusual_characters_keeps_its_views(tmp_path):
    data = DataDir(tmp_path / "my data, $dir (2026) ü%;")
    publish_one_partition(data)
    RunLedger(data, load_dataset_config("demo"), RUN_DATE, "local").refresh_views()
    assert read_catalog(data.catalog, "SELECT dataset, prompt_id, num_tokens FROM published "
                                      "ORDER BY prompt_id") == [("demo", "p1", 3),
                                                                ("demo", "p2", 4)]
    assert read_catalog(data.catalog, "SELECT dataset, rows FROM rows_per_dataset_date"
                        ) == [("demo", 2)]


# Item 4: a deployment run names a dataset; only the command line takes a path.

def deployment_run(**parameters) -> State:
    """A flow run of a distill deployment with `parameters`, run by Prefect's flow engine as a
    worker's child process runs it."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(distill)
        deployment_id = client.create_deployment(flow_id, name="hostile-parameters",
                                                 entrypoint="flows/distill.py:distill")
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    return run_flow(distill, flow_run=flow_run, return_type="state")


def flow_run_message(state: State) -> str:
    """The final state's message as the API stores it (`prefect flow-run inspect`, the UI)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).state.message


def test_a_deployment_run_refuses_a_dataset_path(tmp_path):
    config = tmp_path / "config" / "x.yaml"
    config.parent.mkdir()
    config.write_text((DATASETS_DIR / "demo.yaml").read_text()
                      .replace("tiny:teacher", str(tmp_path / "no-teacher")))
    data_dir = tmp_path / "data"
    for dataset in (str(config), "../../x", "demo/../demo"):
        state = deployment_run(dataset=dataset, run_date=str(RUN_DATE), data_dir=str(data_dir))
        assert state.is_failed()
        message = flow_run_message(state)
        assert f"dataset {dataset!r}: a deployment run takes the name of a file in " \
               f"flows/datasets/" in message, message
    statuses = read_catalog(data_dir / "catalog.duckdb",
                            "SELECT dataset, status FROM runs ORDER BY dataset")
    assert statuses == sorted([("../../x", "failed"), ("demo/../demo", "failed"),
                               (str(config), "failed")])
    assert not (data_dir / "shards").exists() and not (data_dir / "published").exists()


def test_the_command_line_help_says_a_path_is_for_the_command_line_only():
    finished = subprocess.run([sys.executable, "-m", "flows.distill", "--help"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0
    assert "a path to a dataset YAML (command line only" in " ".join(finished.stdout.split())


# Item 9: shard_size.

@pytest.mark.parametrize("shard_size", [0, -1])
def test_a_shard_size_below_one_is_refused_before_any_work(tmp_path, shard_size):
    with pytest.raises(ValueError, match=rf"^shard_size: {shard_size}; give at least 1"):
        distill(dataset="demo", run_date=RUN_DATE, shard_size=shard_size,
                data_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# Item 15: prompt templates.

@pytest.mark.parametrize("template", [
    "{question:{question.__class__}}", "{question.__class__}", "{question[0]}", "{question!r}",
    "{question:>10}", "{}", "{0}", "{question", "question}"])
def test_a_template_field_other_than_a_plain_column_is_refused_at_load(template):
    config = yaml.safe_load((DATASETS_DIR / "demo.yaml").read_text())
    config["prompts"]["theta_template"] = template
    with pytest.raises(ConfigError, match=r"prompts\.theta_template: .*\{column\}"):
        parse_dataset_config(yaml.safe_dump(config), "demo.yaml")


# Items 17 and 18: a config that does not load is recorded; reading creates nothing.

def test_a_mistyped_dataset_fails_the_flow_run_with_the_reason_and_is_recorded(tmp_path):
    state = deployment_run(dataset="nosuchdataset", run_date=str(RUN_DATE),
                           data_dir=str(tmp_path))
    assert state.is_failed()
    message = flow_run_message(state)
    assert "dataset 'nosuchdataset': no config at" in message, message
    assert "known: ['demo', 'gsm8k']" in message
    (run_id, dataset, status, recorded), = read_catalog(
        tmp_path / "catalog.duckdb",
        "SELECT run_id, dataset, status, message FROM latest_runs")
    assert (dataset, status) == ("nosuchdataset", "failed")
    assert run_id == f"nosuchdataset-{RUN_DATE}-{state.state_details.flow_run_id.hex[:8]}"
    assert recorded.startswith("ConfigError: dataset 'nosuchdataset': no config at")
    assert recorded.split(": ", 1)[1] in message
    readme_command = ('.venv/bin/duckdb -readonly "${DISTILL_DATA_DIR:-data}/catalog.duckdb" '
                      '-c "select dataset, status from latest_runs"')
    shown = subprocess.run(["bash", "-c", readme_command], cwd=REPO_ROOT, capture_output=True,
                           text=True, env={**os.environ, "DISTILL_DATA_DIR": str(tmp_path)},
                           timeout=120)
    assert shown.returncode == 0 and "nosuchdataset" in shown.stdout and "failed" in shown.stdout


@pytest.mark.parametrize("folder", ["missing", "."])
def test_reading_a_catalog_before_the_first_run_says_so_and_creates_nothing(tmp_path, folder):
    catalog = tmp_path / folder / "catalog.duckdb"
    with pytest.raises(FileNotFoundError, match="appears after the first run"):
        read_catalog(catalog, "SELECT * FROM latest_runs")
    assert list(tmp_path.iterdir()) == []
