"""Where everything lives under a data directory, in one place so that every step agrees.

    catalog.duckdb                                   the warehouse (tables and views)
    shards/<dataset>/<key>.parquet                   generated shards, reused by key
    work/<run id>.json                               a run's shards, for GPU workers to read
    published/dataset=<d>/generation=<g>/run_date=<date>/data.parquet
    quarantine/<dataset>/<run id>/<key>.parquet      shards that failed validation
    gx/, validation/<run id>/, reports/<run id>/     GX context, results, run reports
    locks/                                           run locks and shared-resource locks
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from sampler.errors import ConfigError

#: Glob characters, quotes and control characters: the catalog's `published` view reads the
#: data dir's files through a glob in SQL text (DuckDB binds no parameters in a view), where
#: these would change what it matches or end its literal.
NOT_IN_DATA_DIR = re.compile(r"[*?\[\]{}'\"\x00-\x1f\x7f]")


@dataclass(frozen=True)
class DataDir:
    root: Path

    def __post_init__(self) -> None:
        for resolve in (False, True):     # the path as given, then where its links lead
            path = str(self.root.resolve() if resolve else self.root)
            if found := NOT_IN_DATA_DIR.search(path):
                raise ConfigError(f"data_dir {str(self.root)!r}: {found.group()!r} is not "
                                  "allowed in a data directory's path (no glob characters "
                                  "*?[]{}, quotes or control characters)")

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def published(self) -> Path:
        return self.root / "published"

    @property
    def gx(self) -> Path:
        return self.root / "gx"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def shard(self, dataset: str, key: str) -> Path:
        return self.shards / dataset / f"{key}.parquet"

    @property
    def work(self) -> Path:
        """Work orders of fanned-out runs (tasks/fan_out.py)."""
        return self.root / "work"

    @property
    def validations(self) -> Path:
        return self.root / "validation"

    def work_order(self, run_id: str) -> Path:
        return self.work / f"{run_id}.json"

    def quarantined(self, dataset: str, run_id: str, name: str) -> Path:
        return self.root / "quarantine" / dataset / run_id / name

    def validation(self, run_id: str) -> Path:
        return self.validations / run_id

    def reports(self, run_id: str) -> Path:
        return self.root / "reports" / run_id

    def dataset_folder(self, dataset: str) -> Path:
        """Every published partition of one dataset lies below this folder."""
        return self.published / f"dataset={dataset}"

    def partition(self, dataset: str, generation: str, run_date: date) -> Path:
        return (self.dataset_folder(dataset) / f"generation={generation}"
                / f"run_date={run_date.isoformat()}" / "data.parquet")

    def dataset_partitions(self, dataset: str) -> list[tuple[str, date, Path]]:
        """Every published partition file of one dataset: (generation, run date, path)."""
        folder = self.dataset_folder(dataset)
        return [(path.parent.parent.name.removeprefix("generation="),
                 date.fromisoformat(path.parent.name.removeprefix("run_date=")), path)
                for path in folder.glob("generation=*/run_date=*/data.parquet")]

    def partitions(self, dataset: str, generation: str) -> dict[date, Path]:
        """The published partition files of one dataset and generation, by run date."""
        return {day: path for key, day, path in self.dataset_partitions(dataset)
                if key == generation}

    def published_glob(self) -> str:
        """Every published partition file, as the catalog's `published` view reads them
        (free of glob characters and quotes but its own: see NOT_IN_DATA_DIR)."""
        return str(self.published.resolve() / "*" / "*" / "*" / "*.parquet")
