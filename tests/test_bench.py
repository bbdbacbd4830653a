"""The benchmark scripts run (on a tiny size; their numbers are measured by `make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_store_ingest_runs_and_prints_its_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "store_ingest.py"), "--rows", "3000", "--batch", "1000",
         "--repeats", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "re-append (0 added)" in proc.stdout and "ingest" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "the benchmark cleans up after itself"
