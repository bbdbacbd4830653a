"""Benchmark: `selm-data view` pages on a 100k-pair iteration, server-side.

Setup (untimed): the store of `bench/export.py` (`fill`): one iteration of N prompts with the
three candidates each (UltraFeedback texts from the bundled rows, made distinct per prompt), a
ranking and a pair, written through `Store.append`; then a snapshot of it (`export`).

Timed: each page requested `--repeats` times in-process through the ASGI app (Starlette's
TestClient: routing, queries, template rendering; no network). The first request of a page is
reported apart ("first"): the first search of an iteration reads all its texts into memory
(`queries.TextIndex`), the first overview computes `inspect`'s statistics; the median is over
the requests after it, as a user paging and refining a search sees them. The page the goal is
about: 50 pairs of the iteration with a filter (no ties, y_ref between) and a text search over
the prompts and the three answers, sorted by margin. No baseline: the goal is absolute, at most
300 ms median. The other pages are printed beside it for planning.

Run: python bench/view.py [--pairs 100000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl
from export import fill
from starlette.testclient import TestClient

from selm_data.publish.snapshot import export
from selm_data.store.store import RunInfo, open_store
from selm_data.view.app import make_app

GOAL_MS = 300.0
SEARCH = "/pairs?iter=1&ties=none&ref=between&q=python&sort=-margin"
AGAIN = "/pairs?iter=1&ties=none&ref=between&q=javascript&sort=-margin&page=2"


def timed(client: TestClient, url: str, repeats: int) -> list[float]:
    """Milliseconds of each request (each must answer 200)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = client.get(url)
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="selm-bench-view-"))
    try:
        store = open_store(root / "store", create=True, run=RunInfo.new("bench view"))
        t0 = time.perf_counter()
        fill(store, args.pairs)
        export(store, 1, name="snap")
        print(f"store filled and exported in {time.perf_counter() - t0:.1f} s")
        client = TestClient(make_app(store), base_url="http://127.0.0.1")
        pair_id = store.scan("pairs").select("pair_id").head(1).collect().item()
        prompt_id = store.scan("pairs").select("prompt_id").head(1).collect().item()
        pages = [
            ("50 pairs, filter + text search (the goal)", SEARCH),
            ("the same, another word, page 2", AGAIN),
            ("50 pairs, no filter", "/pairs?iter=1"),
            ("50 pairs, filter, sorted by margin, page 100", "/pairs?iter=1&ties=none&sort=-margin"
                                                            "&page=100"),
            ("50 pairs of the snapshot, text search", "/pairs?snapshot=snap&q=python"),
            ("one pair (texts, ranking, lineage)", f"/pair/{pair_id}"),
            ("one prompt across iterations", f"/prompt/{prompt_id}"),
            ("overview (inspect statistics; cached plot)", "/"),
            ("compare: diff of the iteration and its snapshot", "/compare?a=1&b=snap"),
        ]
        client.get("/plots/scores.png")  # drawn once; the overview page only links it
        results = []
        for label, url in pages:
            runs = timed(client, url, 1 + (args.repeats if "diff" not in label else 2))
            results.append((label, runs[0], statistics.median(runs[1:]), runs[1:]))
            print(f"  {label}: first {runs[0]:.0f} ms, then median {results[-1][2]:.0f} ms",
                  flush=True)
        matches = client.get(SEARCH).text.count('class="pair-row"')
        searched = (store.scan("pairs").filter(~pl.col("is_tie")).select(pl.len())
                    .collect().item())
        print(f"\n{args.pairs:,} pairs in one iteration ({searched:,} not tied); the goal page "
              f"shows {matches} rows")
        print("| page | first ms | then median ms | runs after the first, ms |\n|---|---|---|---|")
        for label, first, median, runs in results:
            print(f"| {label} | {first:.0f} | {median:.0f} | "
                  f"{', '.join(f'{r:.0f}' for r in runs)} |")
        goal = results[0][2]
        print(f"goal page median {goal:.0f} ms (goal at most {GOAL_MS:.0f} ms): "
              f"{'pass' if goal <= GOAL_MS else 'FAIL'}; its first request {results[0][1]:.0f} "
              "ms (reads the iteration's texts into memory)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
