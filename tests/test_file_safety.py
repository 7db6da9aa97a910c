"""What the pipeline writes cannot be turned against files outside the data dir, survives a
power loss once the catalog records it, and publishes nothing of the machine it ran on; the
Hub push never makes an export public by accident.

All on real files. The Hub is the one outside party: `huggingface_hub`'s own HfApi talks to a
small HTTP server on 127.0.0.1 (`FakeHub`) that answers the endpoints a push uses (create a
repo, its info, preupload, commit) the way the Hub does, and records what it was sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.atomic_files import (HOST, remove_stale_temporaries, write_atomically,
                                write_text_atomically)
from tasks.config import DATASETS_DIR, REPO_ROOT, parse_dataset_config
from tasks.dataset_card import (CARD_KEY, GENERATION_KEY, CardPart, PartitionFacts,
                                generation_section)
from tasks.export import ExportError, Partition, push_to_hub, read_partition
from tasks.lineage import describe_generation
from tasks.locking import UnsafeLockFile, exclusive, lock_path, run_in_progress, run_lock
from tasks.shard_rows import SHARD_SCHEMA

RUN_DATE = date(2026, 1, 15)
PRECIOUS = "a file outside the data dir that nothing may change\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_text(PRECIOUS)
    return target


# --- 14: planted links ------------------------------------------------------------------------

def test_a_symlink_or_hard_link_at_a_lock_path_is_refused_and_its_target_unchanged(
        tmp_path, outside):
    data = tmp_path / "data"
    planted = lock_path(data, "demo", RUN_DATE)
    planted.parent.mkdir(parents=True)
    planted.symlink_to(outside)
    with pytest.raises(UnsafeLockFile, match=str(planted)):
        with run_lock(data, "demo", RUN_DATE):
            pass
    with pytest.raises(UnsafeLockFile, match=str(planted)):
        run_in_progress(data, "demo", RUN_DATE)
    gx_lock = data / "locks" / "gx.lock"
    os.link(outside, gx_lock)
    with pytest.raises(UnsafeLockFile, match=str(gx_lock)):
        with exclusive(gx_lock):
            pass
    assert outside.read_text() == PRECIOUS


def test_an_ordinary_lock_file_still_locks_and_names_its_holder(tmp_path):
    data = tmp_path / "data"
    with run_lock(data, "demo", RUN_DATE):
        assert run_in_progress(data, "demo", RUN_DATE)
        assert json.loads(lock_path(data, "demo", RUN_DATE).read_text())["pid"] == os.getpid()
    assert not run_in_progress(data, "demo", RUN_DATE)


def test_a_symlink_at_the_old_predictable_temporary_name_is_not_followed(tmp_path, outside):
    target = tmp_path / "data" / "README.md"
    target.parent.mkdir()
    planted = target.with_name(f".{target.name}.{HOST}.{os.getpid()}."
                               f"{threading.get_ident()}.tmp")
    planted.symlink_to(outside)
    write_text_atomically("the card\n", target)
    assert outside.read_text() == PRECIOUS
    assert target.read_text() == "the card\n" and not target.is_symlink()
    assert planted.is_symlink()            # left as it was; only our own temporaries are used
    assert sorted(p.name for p in target.parent.iterdir()) == [planted.name, "README.md"]


def test_a_writer_killed_before_its_rename_leaves_a_temporary_that_the_next_run_removes(
        tmp_path):
    target = tmp_path / "data" / "shard.parquet"
    code = ("import pyarrow as pa, sys; from pathlib import Path; "
            "from tasks.atomic_files import write_atomically; "
            "write_atomically(pa.table({'a': [1]}), Path(sys.argv[1]), 'shard-write')")
    died = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO_ROOT,
                          env={**os.environ, "DISTILL_CRASH_AT": "shard-write"})
    assert died.returncode == -9
    left = list(target.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f".shard.parquet.{HOST}.")
    assert not target.exists()
    assert remove_stale_temporaries(target.parent) == 1
    assert list(target.parent.iterdir()) == []


# --- 13: the rename reaches the disk ------------------------------------------------------------

def test_every_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(
        tmp_path, monkeypatch):
    """The real os.fsync and os.replace run; wrappers only note which inode each fsync hit."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def noted_fsync(descriptor: int) -> None:
        facts = os.fstat(descriptor)
        events.append(("fsync", (facts.st_dev, facts.st_ino)))
        real_fsync(descriptor)

    def noted_replace(source, target) -> None:
        real_replace(source, target)
        events.append(("replace", Path(target)))

    monkeypatch.setattr(os, "fsync", noted_fsync)
    monkeypatch.setattr(os, "replace", noted_replace)
    new_folder = tmp_path / "data" / "published" / "demo"
    for write, path in ((lambda p: write_atomically(pa.table({"a": [1]}), p),
                         new_folder / "data.parquet"),
                        (lambda p: write_text_atomically("card", p), new_folder / "README.md")):
        events.clear()
        write(path)
        inode = lambda p: (p.stat().st_dev, p.stat().st_ino)    # noqa: E731
        renamed = events.index(("replace", path))
        assert ("fsync", inode(path)) in events[:renamed], events
        assert ("fsync", inode(path.parent)) in events[renamed + 1:], events
    # each folder a write creates is fsynced into its parent
    events.clear()
    deeper = tmp_path / "fresh" / "a" / "b" / "card.md"
    write_text_atomically("x", deeper)
    fsynced = {value for kind, value in events if kind == "fsync"}
    for folder in (tmp_path, tmp_path / "fresh", tmp_path / "fresh" / "a"):
        assert (folder.stat().st_dev, folder.stat().st_ino) in fsynced, folder


# --- 12: nothing local is published -------------------------------------------------------------

def test_published_lineage_and_cards_name_checkpoints_by_name_and_fingerprint_only(tiny_pair):
    config = parse_dataset_config((DATASETS_DIR / "demo.yaml").read_text(), "demo.yaml")
    paths = tuple(str(p) for p in tiny_pair)
    generation = describe_generation(config, paths)
    lineage = generation.row_lineage("run-1", datetime(2026, 1, 15, 12, 0))
    published = json.loads(generation.published_settings)
    facts = bare_facts(generation.key)
    rows = pa.table({name: [lineage[name]] for name in ("generation", "generated_commit",
                                                        "generated_dirty")})
    card = "\n".join(generation_section(CardPart(facts, published), rows))
    for role, path in zip(("teacher", "theta"), paths):
        assert published["checkpoints"][role] == {
            "name": getattr(config.models, role),
            "fingerprint": lineage[f"{role}_fingerprint"]}
        for text in (json.dumps(lineage, default=str), generation.published_settings, card):
            assert path not in text
        assert f"`{getattr(config.models, role)}` (fingerprint " in card
    assert not [name for name in SHARD_SCHEMA.names if name.endswith("_path")]
    # the local catalog keeps where each checkpoint was loaded from
    assert json.loads(generation.settings)["checkpoints"]["theta"]["path"] == paths[1]


def test_an_export_of_a_partition_published_with_local_paths_leaves_them_out(tmp_path):
    """Partitions published before this change have path columns and paths in settings."""
    settings = {"checkpoints": {role: {"name": f"org/{role}", "path": f"/home/me/{role}",
                                       "fingerprint": f"{role}-print"}
                                for role in ("teacher", "theta")}}
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt_id": ["p0"], "teacher_path": ["/home/me/teacher"],
                             "theta_path": ["/home/me/theta"]}).replace_schema_metadata(
        {CARD_KEY: bare_facts("g1").to_json(), GENERATION_KEY: json.dumps(settings)}), path)
    rows, part = read_partition(Partition(path, "g1", RUN_DATE), "demo")
    assert rows.column_names == ["prompt_id", "dataset", "run_date"]
    assert "/home/me" not in str(rows.schema.metadata) + json.dumps(part.settings)
    assert part.settings["checkpoints"]["theta"] == {"name": "org/theta",
                                                     "fingerprint": "theta-print"}


def bare_facts(generation: str) -> PartitionFacts:
    return PartitionFacts(dataset="demo", description="", run_date=RUN_DATE.isoformat(),
                          generation=generation, published_run_id="run-1", counts={},
                          validation={}, curation={}, card={},
                          chat_templates={"teacher": None, "theta": None}, reproduce="")


# --- 11: the Hub push -----------------------------------------------------------------------

class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints a push uses, on 127.0.0.1 (create a repo, its info, the card's YAML
    check, preupload, commit): repos by id with their visibility, and every request and
    committed file path noted."""

    def __init__(self, repos: dict[str, bool]) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos                       # repo id -> private
        self.requests: list[tuple[str, str]] = []
        self.committed: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        parts = self.path.split("?")[0].split("/")          # /api/datasets/org/name[/...]
        repo = "/".join(parts[3:5])
        if parts[1:3] == ["api", "datasets"] and repo in self.server.repos:
            return self.reply(200, {"id": repo, "private": self.server.repos[repo],
                                    "sha": "0" * 40, "siblings": []})
        self.reply(404, {"error": "Repository not found"})

    def do_POST(self) -> None:
        self.server.requests.append(("POST", self.path))
        body, parts = self.body(), self.path.split("?")[0].split("/")
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in self.server.repos:
                return self.reply(409, {"error": "You already created this dataset repo",
                                        "url": f"{self.server.url}/datasets/{repo}"})
            self.server.repos[repo] = payload.get("visibility") == "private"
            return self.reply(200, {"url": f"{self.server.url}/datasets/{repo}"})
        if self.path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        repo = "/".join(parts[3:5])
        if parts[5:6] == ["preupload"]:
            return self.reply(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]]})
        if parts[5:6] == ["commit"]:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.committed.append(item["value"]["path"])
            return self.reply(200, {"commitUrl": f"{self.server.url}/datasets/{repo}/commit/1",
                                    "commitOid": "1" * 40})
        self.reply(404, {"error": f"not a Hub endpoint here: {self.path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = FakeHub({"org/public-one": False, "org/private-one": True})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_local_fake_hub")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def export_folder(tmp_path) -> Path:
    folder = tmp_path / "export"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("# card\n")
    (folder / "data" / "a.parquet").write_bytes(b"PAR1")
    return folder


def test_a_push_to_an_existing_public_repo_is_refused_without_public(hub, export_folder):
    with pytest.raises(ExportError, match="org/public-one: the repository exists and is "
                                          "public; nothing uploaded"):
        push_to_hub(export_folder, "org/public-one")
    assert not [path for _, path in hub.requests if "preupload" in path or "commit" in path]
    assert hub.committed == [] and hub.repos["org/public-one"] is False
    url = push_to_hub(export_folder, "org/public-one", private=False)
    assert url.endswith("/datasets/org/public-one/commit/1")
    assert sorted(hub.committed) == ["README.md", "data/a.parquet"]


def test_a_push_creates_a_private_repo_or_uploads_to_an_existing_private_one(hub,
                                                                             export_folder):
    push_to_hub(export_folder, "org/new-one")
    assert hub.repos["org/new-one"] is True
    push_to_hub(export_folder, "org/private-one")
    assert sorted(hub.committed) == ["README.md", "README.md", "data/a.parquet",
                                     "data/a.parquet"]


def test_the_token_is_never_a_command_line_argument(hub, monkeypatch, tmp_path, capsys):
    from flows.export import main

    arguments = ["--dataset", "demo", "--out", str(tmp_path / "out"), "--hub-repo", "org/x"]
    with pytest.raises(SystemExit):
        main([*arguments, "--token", "hf_secret"])
    assert "--token is no longer accepted" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SystemExit):
        main(arguments)
    assert "set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert hub.requests == [] and not (tmp_path / "out").exists()
