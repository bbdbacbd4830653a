"""The README's polars example runs as written against a store with an iteration 2."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import chain_rows, write_chain
from selm_data import open_store
from selm_data.store.store import RunInfo

README = Path(__file__).resolve().parents[1] / "README.md"


def test_polars_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    store = open_store("runs/demo/store", create=True, run=RunInfo.new("pytest"))
    for iteration in (1, 2):
        write_chain(store, chain_rows(iteration=iteration, n_prompts=2 + iteration))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "shape: (4, 6)" in out  # the 4 pairs of iteration 2 with their chosen texts
    assert out.count("dataset_chosen") == 4 and "good answer 3" in out


def test_polars_cookbook_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    code = blocks[1]
    assert "cookbook" in README.read_text(encoding="utf-8").split(code)[0][-300:]
    monkeypatch.chdir(tmp_path)
    store = open_store("runs/demo/store", create=True, run=RunInfo.new("pytest"))
    rows = {1: chain_rows(iteration=1, n_prompts=2), 2: chain_rows(iteration=2, n_prompts=3)}
    rows[1]["pairs"][0].update(is_tie=True, margin=0.0)
    for iteration in (1, 2):
        write_chain(store, rows[iteration])
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "shape: (6, 4)" in out  # 2 rankings of iteration 1, three candidates each
    assert "shape: (1, 2)" in out and "0.0" in out  # the one tie
    assert "shape: (2, 2)" in out  # y_ref_chosen per iteration (0.0: chain_rows' y_w wins)
