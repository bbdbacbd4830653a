"""Datasets without scores, iterations that are all ties, and iterations with nothing in them:
every report, `inspect`, card and `diff` prints something true instead of crashing.

HH-RLHF, LLaMA-Factory and most DPO files have prompt, chosen and rejected and no score; a
plain-DPO iteration on them (`pairs: original`) stores pairs whose scores and margins are null.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from cli_inprocess import Outcome, selm_data


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _project(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    manifest = {"name": "unscored", "store": "store", "source": {"path": "pairs.jsonl"},
                "policy": {"model": "bundled:smollm2-135m-instruct"}, "ranker": {"kind": "demo"},
                "iterations": [{"pairs": "original"}, {"pairs": "original"}]}
    (tmp_path / "selm.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return tmp_path


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    def run(*args: str, code: int = 0) -> Outcome:
        result = selm_data(list(args), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert result.code == code, result.out + result.err
        if code == 2:
            assert result.err.startswith("error: "), result.err
        return result
    return run


def _snapshot(out: str) -> str:
    return out.split("exported ")[1].split(":")[0]


def test_pairs_without_scores(tmp_path: Path, run) -> None:
    _project(tmp_path, [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                        for i in range(6)])
    built = run("build", "--iter", "1").out
    assert "margins: none (the pairs have no scores)" in built
    assert "chosen (dataset_chosen, no score): good 0" in built
    assert run("build", "--iter", "1").code == 0  # a rerun reports the same, no crash

    name = _snapshot(run("export", "--iter", "1").out)
    shown = run("inspect").out
    assert "pairs" in shown and "n/a" in shown
    plot = run("inspect", "--plot", str(tmp_path / "p.png"), code=2)
    assert "has pairs but no scores to plot" in plot.err
    # min-margin has nothing to compare against: no pair is kept, and the export says so
    run("export", "--iter", "1", "--min-margin", "0.5", code=2)
    assert "changed" in run("diff", "1", name).out
    run("push", name, "--dry-run", str(tmp_path / "repo"))
    card = (tmp_path / "repo" / "README.md").read_text(encoding="utf-8")
    assert "no scores" in card
    # the default export's card describes the trl layout's columns, not UltraFeedback's
    assert "Layout `trl`" in card and "| `prompt` | the prompt turns (messages)" in card


def test_an_iteration_of_ties_only(tmp_path: Path, run) -> None:
    _project(tmp_path, [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}",
                         "score_chosen": 5.0, "score_rejected": 5.0} for i in range(6)])
    assert "margins: mean 0.000" in run("build", "--iter", "1").out
    name = _snapshot(run("export", "--iter", "1").out)
    dropped = run("export", "--iter", "1", "--drop-ties", code=2)
    assert "passes --drop-ties: of its 3 pairs, 3 are ties" in dropped.err
    run("inspect", "--iter", "1")
    run("inspect", "--plot", str(tmp_path / "ties.png"))
    run("diff", name, "1")
    run("push", name, "--dry-run", str(tmp_path / "repo"))


def test_iterations_with_nothing_in_them(tmp_path: Path, run) -> None:
    _project(tmp_path, [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                        for i in range(6)])
    run("build", "--iter", "1")
    assert "selm-data build --iter 2" in run("inspect", "--iter", "2", code=2).err
    assert "selm-data build --iter 2" in run("export", "--iter", "2", code=2).err
    assert "selm-data build --iter 2" in run("diff", "1", "2", code=2).err
    assert "selm-data export" in run("push", "nope", "--dry-run", "repo", code=2).err
    run("inspect", "--plot", str(tmp_path / "p.png"), "--iter", "2", code=2)
