"""A dataset's published partitions (all dates or chosen ones) as one folder that
`datasets.load_dataset` opens as is, and the push of that folder to the Hugging Face Hub.

The folder holds `data/<generation>-<run date>.parquet` (each partition's rows, with `dataset`
and `run_date` columns and the partition's own metadata) and one dataset card over all of
them. It is built beside the target and renamed into place, so the target is the old export
or the new one, never a mix. What it replaces is deleted, so the target may be only an empty
folder or (with --overwrite) an earlier export, never the data directory, one inside it or
one that holds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.atomic_files import (make_folders, replace_durably, write_atomically,
                                write_text_atomically)
from tasks.dataset_card import CARD_TITLE, GENERATION_KEY, CardPart, PartitionFacts, render_card
from tasks.layout import DataDir

logger = logging.getLogger(__name__)


#: Columns of partitions published before checkpoints were named by name and fingerprint only:
#: their local folders. An export leaves them out, and the paths in their settings.
LOCAL_PATH_COLUMNS = ("teacher_path", "theta_path")


class ExportError(ValueError):
    """What to export cannot be exported; the message names the partition or the option."""


@dataclass(frozen=True)
class Partition:
    path: Path
    generation: str
    run_date: date


@dataclass(frozen=True)
class ExportResult:
    folder: str
    files: list[str]
    rows: int


def find_partitions(data: DataDir, dataset: str, run_dates: list[date] | None = None,
                    generations: list[str] | None = None) -> list[Partition]:
    """The dataset's published partitions, oldest date first; a chosen date or generation
    that has none is an error naming it."""
    folder = data.dataset_folder(dataset)
    found = [Partition(path, generation, day)
             for generation, day, path in data.dataset_partitions(dataset)]
    for option, chosen, have in (("--run-date", run_dates, {p.run_date for p in found}),
                                 ("--generation", generations, {p.generation for p in found})):
        missing = sorted(str(value) for value in set(chosen or ()) - have)
        if missing:
            raise ExportError(f"{option} {', '.join(missing)}: dataset {dataset!r} has no "
                              f"published partition for it in {folder} (it has "
                              f"{sorted(str(v) for v in have) or 'none'})")
    chosen = [p for p in found if (not run_dates or p.run_date in run_dates)
              and (not generations or p.generation in generations)]
    if not chosen:
        raise ExportError(f"dataset {dataset!r}: nothing published in {folder}")
    return sorted(chosen, key=lambda p: (p.run_date, p.generation))


def read_partition(partition: Partition, dataset: str) -> tuple[pa.Table, CardPart]:
    """A partition's rows with `dataset` and `run_date` added, and what its card says; no
    local checkpoint path of an older partition goes with them."""
    table = pq.read_table(partition.path)
    metadata = table.schema.metadata or {}
    try:
        facts = PartitionFacts.from_metadata(metadata, str(partition.path))
    except ValueError as error:
        raise ExportError(str(error)) from None
    try:
        settings = json.loads(metadata[GENERATION_KEY])
        checkpoints = settings["checkpoints"].values()
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        raise ExportError(f"{partition.path}: its {GENERATION_KEY.decode()} metadata is missing "
                          f"or lacks the checkpoints ({error!r}); it was published by an "
                          "earlier version: run its date again") from None
    for checkpoint in checkpoints:
        checkpoint.pop("path", None)
    table = table.drop_columns([c for c in LOCAL_PATH_COLUMNS if c in table.column_names])
    table = table.replace_schema_metadata(
        {**metadata, GENERATION_KEY: json.dumps(settings, sort_keys=True).encode()})
    rows = table.num_rows
    table = table.append_column("dataset", pa.array([dataset] * rows, pa.string()))
    table = table.append_column("run_date", pa.array([partition.run_date] * rows, pa.date32()))
    return table, CardPart(facts, settings)


def export_dataset(data: DataDir, dataset: str, out: Path, run_dates: list[date] | None = None,
                   generations: list[str] | None = None, overwrite: bool = False
                   ) -> ExportResult:
    """Write the chosen partitions and their card to `out` (refused if it holds anything,
    unless `overwrite` and it is an earlier export)."""
    out = out.resolve()
    check_out(out, data, overwrite)
    partitions = find_partitions(data, dataset, run_dates, generations)
    read = [read_partition(p, dataset) for p in partitions]
    metadata = [table.schema.metadata for table, _ in read]
    # one schema for all files (load_dataset refuses files that differ); a column some
    # partitions lack is null there
    every = pa.concat_tables([table.replace_schema_metadata(None) for table, _ in read],
                             promote_options="permissive")
    names = [f"data/{p.generation}-{p.run_date.isoformat()}.parquet" for p in partitions]
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        offset = 0
        for name, (table, _), file_metadata in zip(names, read, metadata):
            rows = every.slice(offset, table.num_rows)
            write_atomically(rows.replace_schema_metadata(file_metadata), staging / name,
                             "export")
            offset += table.num_rows
        dates = sorted({p.run_date.isoformat() for p in partitions})
        commands = [*dict.fromkeys(part.facts.reproduce for _, part in read),
                    " ".join([f"python -m flows.export --dataset {dataset} --out {out.name}",
                              *(f"--run-date {d}" for d in dates),
                              *(f"--generation {g}" for g in sorted(set(generations or ())))])]
        card = render_card([part for _, part in read], every, names, commands)
        write_text_atomically(card, staging / "README.md", "export-card")
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %d rows of %s (%d partitions) to %s", every.num_rows, dataset,
                len(partitions), out)
    return ExportResult(str(out), names, every.num_rows)


def check_out(out: Path, data: DataDir, overwrite: bool) -> None:
    """Refuse an `out` that would replace or nest with the data directory, is a file, or
    holds anything but (with `overwrite`) an earlier export: the swap deletes what was there."""
    root = data.root.resolve()
    if out.is_relative_to(root) or root.is_relative_to(out):
        raise ExportError(f"--out {out}: is, holds or lies inside the data directory {root}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"--out {out}: the folder is not empty; pass --overwrite to "
                          "replace it")
    if not is_export(out):
        raise ExportError(f"--out {out}: --overwrite replaces only an earlier export (data/ "
                          "with Parquet files and its README.md card); this folder is not one")


def is_export(folder: Path) -> bool:
    """Whether `folder` holds only what `export_dataset` writes: data/*.parquet and the card."""
    card, files = folder / "README.md", folder / "data"
    return ({entry.name for entry in folder.iterdir()} == {"README.md", "data"}
            and card.is_file() and CARD_TITLE in card.read_text(errors="replace")
            and files.is_dir() and all(entry.is_file() and entry.suffix == ".parquet"
                                       for entry in files.iterdir()))


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the finished folder to `out`, replacing what was there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        replace_durably(out, old)
        replace_durably(staging, out)
        shutil.rmtree(old)
    else:
        make_folders(out.parent)
        replace_durably(staging, out)


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload an exported folder as a Hub dataset repository; returns the commit URL.

    The token comes from HF_TOKEN or the login cache (`hf auth login`), never from the command
    line (where `ps` and the shell history would show it). `create_repo(private=True)` leaves
    an existing public repository public, so its visibility is checked before anything is sent.
    """
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise ExportError(f"--hub-repo {repo_id}: no Hub token; set HF_TOKEN or run "
                          "`hf auth login`")
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="dataset").private:
        raise ExportError(f"--hub-repo {repo_id}: the repository exists and is public; "
                          "nothing uploaded. Pass --public to publish there, or make it "
                          "private on the Hub first")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                               commit_message=f"Export of {folder.name}")
    return str(commit.commit_url)
