"""What makes a generation: the sampler's code version, the git state recorded with it, and
checkpoint fingerprints, on real files, a real git repository and the tiny checkpoints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.config import DATASETS_DIR, REPO_ROOT, parse_dataset_config
from tasks.lineage import (GENERATION_CODE, checkpoint_fingerprint, describe_generation,
                           git_state, local_checkpoint, sampler_version)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the generation code and the README, committed to a fresh git repository."""
    for entry in GENERATION_CODE:
        source, target = REPO_ROOT / entry, tmp_path / entry
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    (tmp_path / "README.md").write_text("# readme\n")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                        "user.email=t@t", *args], check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "generation code")
    return tmp_path


def test_sampler_version_and_dirty_flag_follow_only_the_generation_code(repo):
    version = sampler_version(repo)
    commit, dirty = git_state(repo)
    assert len(commit) == 40 and dirty is False
    (repo / "README.md").write_text("# readme, edited\n")
    assert sampler_version(repo) == version and git_state(repo) == (commit, False)
    with (repo / "sampler" / "mixing.py").open("a") as handle:
        handle.write("\n# a change to the sampler\n")
    assert sampler_version(repo) != version and git_state(repo) == (commit, True)


def test_checkpoint_fingerprint_reads_config_and_weights_header(tiny_pair, tmp_path):
    theta = Path(tiny_pair[1])
    copy = tmp_path / "theta"
    shutil.copytree(theta, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(theta) is not None
    assert checkpoint_fingerprint(Path(tiny_pair[0])) != checkpoint_fingerprint(theta)
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace("}", ', "edited": true}', 1))
    edited = checkpoint_fingerprint(copy)
    assert edited != checkpoint_fingerprint(theta)
    with (copy / "model.safetensors").open("ab") as handle:
        handle.write(b"\0")
    assert checkpoint_fingerprint(copy) != edited
    assert local_checkpoint(str(copy)) == copy
    assert local_checkpoint("no-such-org/no-such-model") is None
    assert local_checkpoint("tiny:theta") is None and checkpoint_fingerprint(None) is None


def test_generation_key_changes_with_settings_and_code_not_with_paths(repo, tiny_pair,
                                                                      tmp_path):
    text = (DATASETS_DIR / "demo.yaml").read_text()
    config = parse_dataset_config(text, "demo.yaml")
    paths = tuple(str(p) for p in tiny_pair)
    base = describe_generation(config, paths, repo)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_pair[0], moved / "teacher")
    shutil.copytree(tiny_pair[1], moved / "theta")
    same = describe_generation(config, (str(moved / "teacher"), str(moved / "theta")), repo)
    assert same.key == base.key and same.teacher.path != base.teacher.path
    per_run = parse_dataset_config(text.replace("samples_per_prompt: 1",
                                                "samples_per_prompt: 1\n  samples_per_run: 2"))
    assert describe_generation(per_run, paths, repo).key == base.key
    system = parse_dataset_config(text.replace("careful math teacher", "brief math teacher"))
    assert describe_generation(system, paths, repo).key != base.key
    with (repo / "sampler" / "api.py").open("a") as handle:
        handle.write("\n# a change to the sampler\n")
    changed = describe_generation(config, paths, repo)
    assert changed.key != base.key and changed.dirty is True and base.dirty is False
