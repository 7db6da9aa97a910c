"""Shared fixtures: the GSM8K file and a tiny local teacher/theta pair, built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.generation import GSM8K_PATH  # noqa: E402 - after the environment is set


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict]:
    with GSM8K_PATH.open() as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, gsm8k_rows) -> tuple[Path, Path]:
    from sampler.tiny_models import make_tiny_pair

    corpus = [row["question"] + "\n" + row["answer"] for row in gsm8k_rows]
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"), corpus)
