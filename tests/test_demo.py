"""`make demo`'s first screen: what the demo did and the SQL answer, nothing else.

Runs `python -m flows.demo` as a user would (its own process, Prefect in ephemeral mode) and
reads what reached the terminal: Prefect's temporary server, vLLM and Great Expectations
write to the log file the demo names, not to the screen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tasks.config import REPO_ROOT

NOISE = ("Traceback", "database is locked", "Calculating Metrics", "| INFO", "| ERROR",
         "WARNING", "it/s]")


def test_first_screen_shows_the_run_and_the_sql_answer_only(tmp_path):
    environment = {**os.environ, "DISTILL_DATA_DIR": str(tmp_path)}
    environment.pop("PREFECT_API_URL", None)
    finished = subprocess.run([sys.executable, "-m", "flows.demo"], cwd=REPO_ROOT,
                              env=environment, capture_output=True, text=True, timeout=900)
    screen = finished.stdout + finished.stderr
    assert finished.returncode == 0, screen
    assert not [word for word in NOISE if word in screen], screen
    assert screen.startswith("Running the demo dataset")
    published = re.search(r"Published (\d+) rows(?: \((\d+) more stopped at max_tokens)?",
                          screen)
    assert published, screen
    assert int(published.group(1)) + int(published.group(2) or 0) == 12
    assert re.search(r"SELECT \* FROM rows_per_dataset_date;\n.*\n\s*demo ", screen), screen
    log_path = Path(re.search(r"Full log: (\S+)", screen).group(1))
    log = log_path.read_text()
    assert "Beginning flow run" in log and "temporary server" in log
    assert len(screen.splitlines()) < 25
