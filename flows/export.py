"""Export a published dataset to a folder that `datasets.load_dataset` opens as is, and push
it to the Hugging Face Hub with --hub-repo (private unless --public).

    python -m flows.export --dataset demo --out exports/demo [--run-date 2026-01-15 ...]
    python -m flows.export --dataset gsm8k --out exports/gsm8k --hub-repo org/name

The Hub token is read from HF_TOKEN or the login cache (`hf auth login`), never from the
command line, where `ps` and the shell history would show it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date
from pathlib import Path

from tasks.export import ExportError, export_dataset, push_to_hub
from tasks.layout import DataDir

logger = logging.getLogger("export")


def main(argv: list[str] | None = None) -> int:
    from flows.distill import DEFAULT_DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run-date", type=date.fromisoformat, action="append",
                        help="a run date to export (repeat for several; default: all)")
    parser.add_argument("--generation", action="append",
                        help="a generation key to export (repeat for several; default: all)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out")
    parser.add_argument("--hub-repo", help="push the folder to this Hub dataset repository")
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--public", action="store_true",
                        help="push to a public Hub repo (default: private; an existing public "
                             "repo is refused without it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    if args.token is not None:
        parser.error("--token is no longer accepted (it shows in `ps` and the shell history); "
                     "set HF_TOKEN or run `hf auth login`")
    if args.hub_repo:
        from huggingface_hub import get_token

        if get_token() is None:
            parser.error("--hub-repo needs a Hub token: set HF_TOKEN or run `hf auth login`")
    try:
        result = export_dataset(DataDir(args.data_dir.resolve()), args.dataset, args.out,
                                args.run_date, args.generation, args.overwrite)
        summary = {"folder": result.folder, "files": result.files, "rows": result.rows}
        if args.hub_repo:
            summary["hub_commit"] = push_to_hub(Path(result.folder), args.hub_repo,
                                                private=not args.public)
    except ExportError as error:
        logger.error("%s", error)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
