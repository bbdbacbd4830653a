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


@pytest.mark.slow
def test_store_longevity_runs_and_prints_its_tables(tmp_path):
    pytest.importorskip("moto", reason="install the test extra: pip install 'selm[test]'")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "store_longevity.py"), "--commits", "30", "--probe", "3",
         "--s3-commits", "3", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "30 commits, after optimize" in proc.stdout and "S3 (moto" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "the benchmark cleans up after itself"


@pytest.mark.slow
def test_rank_bench_runs_on_a_tiny_ranker():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "rank.py"), "--size", "tiny", "--prompts", "3",
         "--repeats", "1", "--vocab", "1000"],
        capture_output=True, text=True, timeout=600, cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "identical rankings" in proc.stdout.lower() and "3 / 3" in proc.stdout


@pytest.mark.slow
def test_export_bench_runs_and_checks_determinism():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "export.py"), "--pairs", "1500", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ratio" in proc.stdout and "1,500 pairs" in proc.stdout


@pytest.mark.slow
def test_scale_build_bench_runs_two_ranks(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scale_build.py"), "--ranks", "1", "2", "--prompts", "32",
         "--gen-ms", "5", "--rank-ms", "1", "--commit-every", "16", "--repeats", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "baseline" in proc.stdout and "ratio" in proc.stdout and "commits" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "the benchmark cleans up after itself"


@pytest.mark.slow
def test_view_bench_runs_on_a_small_iteration():
    pytest.importorskip("starlette", reason="install the view extra: pip install 'selm[view]'")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "view.py"), "--pairs", "1200", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "goal page median" in proc.stdout and "the goal page shows" in proc.stdout
