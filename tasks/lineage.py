"""Where generated rows come from: the generation they belong to, the code and the checkpoints
that made them.

A generation is everything that changes the samples: the dataset's generation settings (system
prompts, templates, models, sampling, engine), a fingerprint of each checkpoint and the
version of the generation code. Its key names shard files and partitions, so a change of any
of these makes new rows in new partitions and never relabels old ones.

What is published (rows, Parquet metadata, cards) names a checkpoint by its config name and
fingerprint only; the local folder an engine loaded stays in the catalog on this machine, so
a published dataset never shows a home directory or a mount layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from sampler.models import safetensors_header
from tasks.config import REPO_ROOT, DatasetConfig

logger = logging.getLogger(__name__)

#: The code that turns prompts into samples; its hash is the sampler version. Commits that
#: touch only other files (README, tests, flows) leave finished shards valid.
GENERATION_CODE = ("sampler", "tasks/shard_rows.py")
#: Small checkpoint files that pin what a model computes and how it renders its prompt.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja",
                    "model.safetensors.index.json")


def sampler_version(repo: Path = REPO_ROOT) -> str:
    """Hash of the generation code's Python sources (paths and bytes)."""
    digest = hashlib.sha256()
    for entry in GENERATION_CODE:
        base = repo / entry
        for path in sorted([base] if base.is_file() else base.rglob("*.py")):
            digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_state(repo: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """The checked-out commit, and whether the generation code differs from it (uncommitted
    or untracked changes); (None, None) outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", *GENERATION_CODE)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(changes)


def local_checkpoint(name: str) -> Path | None:
    """The folder of a checkpoint given as a path, or of a hub name already in the local hub
    cache (nothing is downloaded); None when neither."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def checkpoint_fingerprint(folder: Path | None) -> str | None:
    """Hash of a checkpoint's config, tokenizer and chat template files and its weights index
    (a single-file checkpoint: each safetensors file's size and header). No weights are read."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    if not (folder / "model.safetensors.index.json").is_file():
        for weights in sorted(folder.glob("*.safetensors")):
            digest.update(f"{weights.name}:{weights.stat().st_size}\0".encode())
            digest.update(safetensors_header(weights))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    name: str                 # as the dataset config gives it
    path: str                 # what the engine loads
    fingerprint: str | None   # None: not resolvable locally (a hub name not in the cache)


@dataclass(frozen=True)
class Generation:
    """One generation of a dataset: its key, resolved settings and the code that runs it."""

    key: str
    settings: str             # JSON: generation settings, checkpoints, sampler version
    published_settings: str   # the same without the checkpoints' local paths
    sampler_version: str
    commit: str | None
    dirty: bool | None
    teacher: Checkpoint
    theta: Checkpoint

    def row_lineage(self, run_id: str, generated_at: datetime) -> dict[str, object]:
        """The lineage columns of every row this generation's shards write."""
        return {"generation": self.key, "generated_run_id": run_id, "generated_at": generated_at,
                "sampler_version": self.sampler_version, "generated_commit": self.commit,
                "generated_dirty": self.dirty,
                "teacher_model": self.teacher.name,
                "teacher_fingerprint": self.teacher.fingerprint,
                "theta_model": self.theta.name, "theta_fingerprint": self.theta.fingerprint}


def describe_generation(config: DatasetConfig, model_paths: tuple[str, str],
                        repo: Path = REPO_ROOT) -> Generation:
    """The generation a run of `config` belongs to, given the checkpoints its engines load.

    The key covers settings, fingerprints and sampler version but not the local paths, so
    the same checkpoints in another folder make the same generation.
    """
    teacher, theta = (Checkpoint(name, path, checkpoint_fingerprint(local_checkpoint(path)))
                      for name, path in zip((config.models.teacher, config.models.theta),
                                            model_paths))
    version = sampler_version(repo)
    identity = {**config.generation_settings(), "sampler_version": version,
                "fingerprints": {"teacher": teacher.fingerprint, "theta": theta.fingerprint}}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    settings, published = (
        json.dumps({**identity, "checkpoints": {role: describe(checkpoint) for role, checkpoint
                                                in (("teacher", teacher), ("theta", theta))}},
                   sort_keys=True)
        for describe in (asdict, public_checkpoint))
    commit, dirty = git_state(repo)
    for checkpoint in (teacher, theta):
        if checkpoint.fingerprint is None:
            logger.warning("no local files for %s: its fingerprint is recorded as null",
                           checkpoint.name)
    return Generation(key, settings, published, version, commit, dirty, teacher, theta)


def public_checkpoint(checkpoint: Checkpoint) -> dict[str, str | None]:
    """What a published dataset says of a checkpoint: its name and fingerprint, not its path."""
    return {"name": checkpoint.name, "fingerprint": checkpoint.fingerprint}
