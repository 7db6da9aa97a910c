"""Shared fixtures: the GSM8K file and the committed tiny trained teacher/theta pair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.config import REPO_ROOT  # noqa: E402 - after the environment is set

GSM8K_PATH = REPO_ROOT / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict]:
    with GSM8K_PATH.open() as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[Path, Path]:
    """models/tiny: trained once by `python -m sampler.tiny_models`, loaded, never retrained."""
    from sampler.tiny_models import tiny_pair_paths

    return tiny_pair_paths()
