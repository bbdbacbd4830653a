"""No traceback for data a user supplies: rows with missing, null, empty and non-string fields,
in every supported source layout and in both evaluation prompt layouts, fed to build, export,
inspect, diff, push --dry-run and eval. Each command either works or exits 2 with a message.

Commands run in this process (`cli_inprocess`): an exception that is not a user error reaches
pytest as a traceback, and fails the test. Builds use `pairs: original` (the dataset's own
pairs, no model); eval generates with a tiny model built on the spot.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from cli_inprocess import Outcome, selm_data
from conftest import build_tiny_lm

from selm_data.sources.dataset import LAYOUTS

HH = "\n\nHuman: {q}\n\nAssistant: {a}"
# One usable row per layout (q and a are filled in to make rows distinct).
GOOD: dict[str, dict[str, Any]] = {
    "flat": {"prompt": "{q}", "chosen": "yes {a}", "rejected": "no {a}", "score_chosen": 2.0,
             "score_rejected": 1.0},
    "ultrafeedback": {
        "prompt": "{q}",
        "chosen": [{"role": "user", "content": "{q}"}, {"role": "assistant", "content": "yes {a}"}],
        "rejected": [{"role": "user", "content": "{q}"},
                     {"role": "assistant", "content": "no {a}"}],
        "score_chosen": 2.0, "score_rejected": 1.0},
    "conversation": {
        "chosen": [{"role": "user", "content": "{q}"}, {"role": "assistant", "content": "yes {a}"}],
        "rejected": [{"role": "user", "content": "{q}"},
                     {"role": "assistant", "content": "no {a}"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "{q}"}],
                 "chosen": {"from": "gpt", "value": "yes {a}"},
                 "rejected": {"from": "gpt", "value": "no {a}"}},
    "hh": {"chosen": HH.format(q="{q}", a="yes {a}"), "rejected": HH.format(q="{q}", a="no {a}")},
}
MISSING = object()
# What a user's file holds where a field should be: absent, null, empty, and not a string.
ODD: dict[str, Any] = {"missing": MISSING, "null": None, "empty string": "", "empty list": [],
                       "empty object": {}, "number": 42, "boolean": True, "list": ["x", 1],
                       "object": {"role": 1}}


def _fill(value: Any, i: int) -> Any:
    if isinstance(value, str):
        return value.replace("{q}", f"question {i}").replace("{a}", f"answer {i}")
    if isinstance(value, list):
        return [_fill(v, i) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, i) for k, v in value.items()}
    return value


def _odd_rows(layout: str) -> list[dict[str, Any]]:
    """Each field of the layout's row (and each field inside its messages) made odd in turn."""
    rows: list[dict[str, Any]] = []
    good = GOOD[layout]
    paths: list[tuple[Any, ...]] = []
    for key, value in good.items():
        paths.append((key,))
        if isinstance(value, list):  # messages: a whole turn, and each key of a turn
            paths += [(key, 0), *((key, len(value) - 1, k) for k in value[-1])]
        if isinstance(value, dict):
            paths += [(key, k) for k in value]
    for path in paths:
        for odd in ODD.values():
            row = copy.deepcopy(_fill(good, len(rows) + 100))
            *parents, last = path
            target = row
            for p in parents:
                target = target[p]
            if odd is MISSING:
                del target[last]
            else:
                target[last] = copy.deepcopy(odd)
            rows.append(row)
    return rows


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    def run(cwd: Path, *args: str) -> Outcome:
        result = selm_data(list(args), cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)
        assert result.code in (0, 2), (args, result.out, result.err)
        if result.code == 2:
            assert "error: " in result.err and "Traceback" not in result.err, result
        return result
    return run


def _project(folder: Path, layout: str, rows: list[dict[str, Any]], **manifest: Any) -> Path:
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    body = {"name": "fuzz", "store": "store",
            "source": {"path": "data.jsonl", "layout": layout},
            "policy": {"model": "bundled:smollm2-135m-instruct"}, "ranker": {"kind": "demo"},
            "iterations": [{"pairs": "original"}], **manifest}
    (folder / "selm.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    return folder


def _every_command(run, folder: Path, layout: str) -> dict[str, int]:
    codes = {"check": run(folder, "sources", "check", "data.jsonl", "--layout", layout).code,
             "build": run(folder, "build", "--iter", "1").code}
    exported = run(folder, "export", "--iter", "1")
    codes["export"] = exported.code
    codes["inspect"] = run(folder, "inspect").code
    codes["plot"] = run(folder, "inspect", "--iter", "1", "--plot", "p.png").code
    name = exported.out.split("exported ")[1].split(":")[0] if exported.code == 0 else "iter1"
    codes["diff"] = run(folder, "diff", "1", name).code
    codes["push"] = run(folder, "push", name, "--dry-run", "repo").code
    for snapshot_layout in ("trl", "ultrafeedback"):
        codes[snapshot_layout] = run(folder, "export", "--iter", "1", "--layout",
                                     snapshot_layout).code
    return codes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_fields_among_good_rows(tmp_path: Path, run, layout: str) -> None:
    rows = [_fill(GOOD[layout], i) for i in range(3)] + _odd_rows(layout)
    folder = _project(tmp_path / layout, layout, rows)
    codes = _every_command(run, folder, layout)
    # The good rows are built and the odd ones quarantined; a layout without score columns
    # has nothing to plot (exit 2, "no scores").
    scored = "score_chosen" in GOOD[layout]
    assert codes == {**dict.fromkeys(codes, 0), "plot": 0 if scored else 2}
    checked = run(folder, "sources", "check", "data.jsonl", "--layout", layout).out
    assert "usable examples" in checked and "quarantined" in checked


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_odd_rows(tmp_path: Path, run, layout: str) -> None:
    _every_command(run, _project(tmp_path / layout, layout, _odd_rows(layout)), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_first_row_with_odd_fields_and_auto_layout(tmp_path: Path, run, layout: str) -> None:
    """Layout detection reads the first row: an odd first row must not make it crash."""
    rows = [*_odd_rows(layout), _fill(GOOD[layout], 0)]
    for i, first in enumerate(rows[: len(ODD)]):
        folder = _project(tmp_path / f"{layout}-{i}", "auto", [first, *rows[-1:]])
        run(folder, "sources", "check", "data.jsonl")
        run(folder, "build", "--iter", "1")


# --- eval prompts ---------------------------------------------------------------------------

EVAL_GOOD = {"alpaca_eval": {"instruction": "Say hi.", "id": 7, "dataset": "mine"},
             "mt_bench": {"question_id": 81, "turns": ["Say hi.", "Again."],
                          "category": "writing"}}


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.mark.parametrize("prompt_layout", list(EVAL_GOOD))
def test_eval_prompt_files_with_odd_fields(tmp_path: Path, run, tiny_policy: Path,
                                           prompt_layout: str) -> None:
    good = EVAL_GOOD[prompt_layout]
    folder = _project(tmp_path / "eval", "flat", [_fill(GOOD["flat"], 0)],
                      policy={"model": str(tiny_policy)},
                      generation={"backend": "transformers", "max_tokens": 4})
    outcomes = {}
    fields = [(k,) for k in good] + ([("turns", 0), ("turns", 1)] if "turns" in good else [])
    for field in fields:
        for kind, odd in ODD.items():
            record = copy.deepcopy(good)
            *parents, last = field
            target: Any = record
            for p in parents:
                target = target[p]
            if odd is MISSING:
                del target[last]
            else:
                target[last] = copy.deepcopy(odd)
            path = folder / f"{'-'.join(map(str, field))}-{kind.replace(' ', '-')}.jsonl"
            first = {**good, "instruction": "First.", "id": "first"} if "instruction" in good else {
                **good, "question_id": 1}
            path.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n", "utf-8")
            result = run(folder, "eval", "--iter", "0", "--prompts", path.name,
                         "--limit", "1")
            outcomes[path.name] = result.code
    assert 0 in outcomes.values() and 2 in outcomes.values(), outcomes
