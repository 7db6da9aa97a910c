"""Per-engine vLLM settings from the pipeline's side: `engine.teacher` / `engine.theta` in the
dataset YAML, what reaches the sampler, the generation key and the card, a worker's GPU check
and the worker script's GPU groups. No engine is built: the sampler's side is
tests/test_tensor_parallel.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from sampler.errors import ConfigError
from tasks.config import DATASETS_DIR, REPO_ROOT, DatasetConfig, parse_dataset_config
from tasks.dataset_card import CardPart, PartitionFacts, engine_lines, generation_section
from tasks.generation import TooFewGPUs, check_gpus
from tasks.lineage import describe_generation
from tasks.shard_rows import sampler_arguments

SCRIPT = REPO_ROOT / "deployments" / "start-gpu-workers.sh"
SCRIPT_SECONDS = 120   # the script imports Prefect (require_api_auth.py), slow under load


def demo_with(**engine: object) -> DatasetConfig:
    """The demo dataset with `engine` settings over its own."""
    raw = yaml.safe_load((DATASETS_DIR / "demo.yaml").read_text())
    raw["engine"] = {**raw["engine"], **engine}
    return parse_dataset_config(yaml.safe_dump(raw), "demo.yaml")


def test_each_engines_settings_reach_the_sampler_for_that_engine_alone():
    config = demo_with(teacher={"tensor_parallel_size": 2, "quantization": "fp8"},
                       theta={"max_num_seqs": 8})
    arguments = sampler_arguments(config)
    assert arguments["teacher_engine_args"] == {"tensor_parallel_size": 2, "quantization": "fp8"}
    assert arguments["theta_engine_args"] == {"max_num_seqs": 8}
    # the shared settings stay shared, for OptimalSamplingV1 to merge each engine's over
    assert (arguments["max_num_seqs"], arguments["max_model_len"], arguments["dtype"]) == (
        16, 1024, "float32")
    plain = sampler_arguments(demo_with())
    assert plain["teacher_engine_args"] == plain["theta_engine_args"] == {}


@pytest.mark.parametrize(("engine", "field"), [
    ({"teacher": {"pipeline_parallel_size": 2}}, "engine.teacher.pipeline_parallel_size"),
    ({"theta": {"pipeline_parallel_size": 4}}, "engine.theta.pipeline_parallel_size"),
    ({"teacher": {"tensor_parallel_size": 0}}, "engine.teacher.tensor_parallel_size"),
    ({"teacher": {"tensor_parallel_size": "two"}}, "engine.teacher.tensor_parallel_size"),
    ({"theta": {"tensor_parallel_size": True}}, "engine.theta.tensor_parallel_size"),
    ({"teacher": ["tensor_parallel_size"]}, "engine.teacher"),
    ({"teacher_tensor_parallel_size": 2}, "engine.teacher_tensor_parallel_size"),
    ({"teacher": {"gpu_memory_utilization": 0}}, "engine.teacher.gpu_memory_utilization"),
    ({"theta": {"gpu_memory_utilization": 1.5}}, "engine.theta.gpu_memory_utilization"),
    ({"theta": {"gpu_memory_utilization": "half"}}, "engine.theta.gpu_memory_utilization"),
    ({"teacher": {"gpu_memory_utilization": 0.7}, "theta": {"gpu_memory_utilization": 0.4}},
     "engine.teacher.gpu_memory_utilization and engine.theta.gpu_memory_utilization sum to 1.1"),
], ids=["pp-teacher", "pp-theta", "tp-zero", "tp-text", "tp-bool", "not-a-mapping",
        "unknown-field", "share-zero", "share-above-one", "share-text", "shares-sum"])
def test_engine_settings_the_pipeline_cannot_run_are_refused_naming_the_field(engine, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as refused:
        demo_with(**engine)
    assert str(refused.value).startswith("demo.yaml: ")


def test_per_engine_settings_make_their_own_generation_named_on_the_card(tiny_pair):
    paths = tuple(str(p) for p in tiny_pair)
    configs = {"plain": demo_with(), "theta": demo_with(theta={"max_num_seqs": 8}),
               "teacher": demo_with(teacher={"tensor_parallel_size": 2}),
               "teacher-fp8": demo_with(teacher={"tensor_parallel_size": 2,
                                                 "quantization": "fp8"})}
    generations = {name: describe_generation(config, paths)
                   for name, config in configs.items()}
    keys = {name: generation.key for name, generation in generations.items()}
    assert len(set(keys.values())) == len(keys), keys
    cards = {name: card_text(generation) for name, generation in generations.items()}
    assert "- engine, theta alone: `max_num_seqs` 8" in cards["theta"]
    assert "- engine, teacher alone: none" in cards["theta"]
    assert "- engine, teacher alone: `tensor_parallel_size` 2" in cards["teacher"]
    assert ("- engine, teacher alone: `quantization` \"fp8\", `tensor_parallel_size` 2"
            in cards["teacher-fp8"])
    assert "- engine, theta alone: none" in cards["teacher-fp8"]
    for card in cards.values():
        assert ('- engine, both: {"cpu_kv_cache_gib": 1, "dtype": "float32", "enforce_eager": '
                'true, "max_model_len": 1024, "max_num_seqs": 16, "theta_process": null}'
                in card)


def test_a_card_of_a_generation_made_before_per_engine_settings_says_none():
    lines = engine_lines({"dtype": "auto", "max_num_seqs": 256})
    assert lines == ['- engine, both: {"dtype": "auto", "max_num_seqs": 256}',
                     "- engine, teacher alone: none", "- engine, theta alone: none"]


def card_text(generation) -> str:
    facts = PartitionFacts(dataset="demo", description="", run_date="2026-01-15",
                           generation=generation.key, published_run_id="run-1", counts={},
                           validation={}, curation={}, card={},
                           chat_templates={"teacher": None, "theta": None}, reproduce="")
    rows = pa.table({"generation": [generation.key], "generated_commit": [generation.commit],
                     "generated_dirty": [generation.dirty]})
    settings = json.loads(generation.published_settings)
    return "\n".join(generation_section(CardPart(facts, settings), rows))


def test_a_worker_with_too_few_gpus_refuses_naming_both_numbers():
    teacher = demo_with(teacher={"tensor_parallel_size": 2})
    with pytest.raises(TooFewGPUs, match=r"engine\.teacher\.tensor_parallel_size needs 2 GPUs, "
                                         r"this worker sees 1 \(CUDA_VISIBLE_DEVICES="):
        check_gpus(teacher, 1)
    with pytest.raises(TooFewGPUs, match=r"engine\.theta\.tensor_parallel_size needs 4 GPUs, "
                                         r"this worker sees 2"):
        check_gpus(demo_with(theta={"tensor_parallel_size": 4}), 2)
    check_gpus(teacher, 2)
    check_gpus(teacher, 8)
    check_gpus(teacher, None)       # no CUDA: the CPU build places its ranks on cores
    check_gpus(demo_with(), 1)


@pytest.fixture
def stub_prefect(tmp_path: Path) -> Path:
    """A `prefect` command that records the arguments and GPU settings it was started with,
    atomically, in a file named by its pid (the pid the script writes to the worker's pid
    file): the script's grouping is under test, not Prefect's worker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "prefect"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        "record=\"$RECORD_DIR/$$\"\n"
        "printf '%s\\n' \"CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES\" "
        "\"OMP_NUM_THREADS=$OMP_NUM_THREADS\" \"$*\" > \"$record.tmp\"\n"
        "mv \"$record.tmp\" \"$record.json\"\n")
    stub.chmod(0o755)
    return bin_dir


def run_script(tmp_path: Path, bin_dir: Path, gpus: str, *arguments: str
               ) -> subprocess.CompletedProcess:
    records = tmp_path / "records"
    records.mkdir(exist_ok=True)
    env = {"PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin",
                                    "/bin"]),
           "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": "http://127.0.0.1:4200/api", "DISTILL_REPO": str(REPO_ROOT),
           "DISTILL_LOG_DIR": str(tmp_path / "logs"), "GPUS": gpus,
           "RECORD_DIR": str(records)}
    return subprocess.run(["bash", str(SCRIPT), *arguments], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=SCRIPT_SECONDS)


def wait_for_record(path: Path) -> list[str]:
    deadline = time.monotonic() + SCRIPT_SECONDS
    while not path.exists():
        assert time.monotonic() < deadline, f"no record {path}"
        time.sleep(0.2)
    return path.read_text().splitlines()


def test_workers_of_two_gpus_each_see_their_own_pair(tmp_path, stub_prefect):
    done = run_script(tmp_path, stub_prefect, "4", "--gpus-per-worker", "2")
    assert done.returncode == 0, done.stderr
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.glob("*.pid")) == ["prefect-gpu-worker-0.pid",
                                                          "prefect-gpu-worker-1.pid"]
    cores = os.cpu_count() or 1
    for worker, devices in ((0, "0,1"), (1, "2,3")):
        pid = (logs / f"prefect-gpu-worker-{worker}.pid").read_text().strip()
        visible, threads, command = wait_for_record(tmp_path / "records" / f"{pid}.json")
        assert visible == f"CUDA_VISIBLE_DEVICES={devices}"
        assert threads == f"OMP_NUM_THREADS={max(cores // 2, 1)}"
        assert command.startswith("worker start --pool distill-gpu --limit 1 --name ")
        assert command.endswith(f"-gpu{devices.replace(',', '-')}")
        assert f"GPU {devices}: worker {pid} started" in done.stdout


@pytest.mark.parametrize(("gpus", "arguments", "message"), [
    ("3", ("--gpus-per-worker", "2"), "3 GPUs do not split into workers of --gpus-per-worker 2"),
    ("4", ("--gpus-per-worker=0",), "--gpus-per-worker: '0' is not a whole number"),
    ("4", ("--gpus-per-worker",), "--gpus-per-worker: '' is not a whole number"),
], ids=["not-a-divisor", "zero", "missing"])
def test_gpu_groups_that_do_not_fit_start_no_worker(tmp_path, stub_prefect, gpus, arguments,
                                                    message):
    done = run_script(tmp_path, stub_prefect, gpus, *arguments)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not list((tmp_path / "records").iterdir())
    assert not (tmp_path / "logs").exists()     # refused before any pid or log file
