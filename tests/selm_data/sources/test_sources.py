"""Sources: every layout through the real `datasets` code path, on real rows where they exist.

Expected numbers are worked out here with plain `json` (or written by hand), not by calling the
code under test again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import get_args

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selm_data.errors import SelmError
from selm_data.manifest import SourceSpec
from selm_data.sources.dataset import (
    LAYOUT_HELP,
    LAYOUTS,
    PARSERS,
    REQUIRED,
    detect_layout,
    load_source,
    normalise,
)

SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
UF_1000 = SHARED_DATA / "ultrafeedback_binarized_1000.jsonl"
BUNDLED = "ultrafeedback_binarized_1000.jsonl"

# Worked by hand from the file (rows 0-based): four pairs whose two answers are the same text,
# one blank chosen (row 833) and one blank rejected (row 478). No prompt repeats.
UF_1000_QUARANTINE = [
    (306, "chosen equals rejected"),
    (478, "missing rejected"),
    (655, "chosen equals rejected"),
    (833, "missing chosen"),
    (910, "chosen equals rejected"),
    (997, "chosen equals rejected"),
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` writes an Arrow copy of each file it loads: keep it in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _expected_flat(raw: list[dict]) -> tuple[list[tuple[int, str]], list[int], int]:
    """Quarantine, kept rows and duplicates of flat rows, in the module's order of checks."""
    quarantine, kept, seen, duplicates = [], [], set(), 0
    for i, r in enumerate(raw):
        reason = (
            "missing chosen" if not r["chosen"].strip()
            else "missing rejected" if not r["rejected"].strip()
            else "empty prompt" if not r["prompt"].strip()
            else "chosen equals rejected" if r["chosen"].strip() == r["rejected"].strip()
            else None
        )
        if reason:
            quarantine.append((i, reason))
        elif r["prompt"] in seen:
            duplicates += 1
        else:
            seen.add(r["prompt"])
            kept.append(i)
    return quarantine, kept, duplicates


def _reasons(loaded) -> list[tuple[int, str]]:
    return [(q.source_row, q.reason) for q in loaded.quarantined]


# --- the flat layout, on the real files -------------------------------------------------------


def test_flat_layout_on_the_real_1000_rows() -> None:
    raw = _raw(UF_1000)
    quarantine, kept, duplicates = _expected_flat(raw)
    assert quarantine == UF_1000_QUARANTINE and duplicates == 0  # the hand count agrees

    loaded = load_source(SourceSpec(path=str(UF_1000)))

    assert (loaded.layout, loaded.rows_read, loaded.split, loaded.revision) == (
        "flat", 1000, "train", None)
    assert loaded.source == str(UF_1000)
    assert _reasons(loaded) == quarantine
    assert loaded.reason_counts() == {
        "chosen equals rejected": 4, "missing rejected": 1, "missing chosen": 1}
    assert loaded.duplicates == duplicates
    assert len(loaded.examples) + len(loaded.quarantined) + loaded.duplicates == 1000
    assert [e.source_row for e in loaded.examples] == kept
    for e in loaded.examples:
        r = raw[e.source_row]
        assert e.messages == [{"role": "user", "content": r["prompt"]}]
        assert (e.chosen, e.rejected) == (r["chosen"], r["rejected"])  # text kept unchanged
        assert e.score_chosen == r["metadata"]["score_chosen"]
        assert e.score_rejected == r["metadata"]["score_rejected"]
        assert e.source_id == str(r["source_index"])
    assert len(loaded.quarantined[0].detail) <= 200


def test_bundled_file_and_forced_flat_layout() -> None:
    raw = _raw(UF_1000)[:200]  # the bundled file is a copy of the shared one
    loaded = load_source(SourceSpec(bundled=BUNDLED, layout="flat", limit=200))

    assert (loaded.layout, loaded.rows_read, loaded.quarantined, loaded.duplicates) == (
        "flat", 200, [], 0)
    assert loaded.source.endswith(BUNDLED)
    assert [(e.chosen, e.score_chosen) for e in loaded.examples] == [
        (r["chosen"], r["metadata"]["score_chosen"]) for r in raw]


def test_limit_applies_before_normalisation() -> None:
    loaded = load_source(SourceSpec(path=str(UF_1000), limit=310))

    # Row 306 is the first unusable row; the rows after 309 are never read.
    assert loaded.rows_read == 310
    assert _reasons(loaded) == [(306, "chosen equals rejected")]
    assert len(loaded.examples) == 309


# --- the Hub's UltraFeedback layout, as a parquet file ----------------------------------------


def _hub_row(r: dict) -> dict:
    """A row of the flat file in HuggingFaceH4/ultrafeedback_binarized's columns."""
    user = {"role": "user", "content": r["prompt"]}
    chosen = [user, {"role": "assistant", "content": r["chosen"]}]
    return {
        "prompt": r["prompt"],
        "prompt_id": hashlib.sha256(r["prompt"].encode()).hexdigest(),
        "chosen": chosen,
        "rejected": [user, {"role": "assistant", "content": r["rejected"]}],
        "messages": chosen,
        "score_chosen": r["metadata"]["score_chosen"],
        "score_rejected": r["metadata"]["score_rejected"],
    }


@pytest.fixture
def hub_parquet(tmp_path: Path) -> tuple[Path, list[dict]]:
    raw = _raw(UF_1000)
    picked = [raw[i] for i in (*range(30), 306, 478, 833)] + [raw[3]]  # last: a repeated prompt
    rows = [_hub_row(r) for r in picked]
    path = tmp_path / "train_prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def test_hub_ultrafeedback_layout_from_parquet(hub_parquet: tuple[Path, list[dict]]) -> None:
    path, rows = hub_parquet
    loaded = load_source(SourceSpec(path=str(path), split="train_prefs", layout="auto"))

    assert (loaded.layout, loaded.split, loaded.rows_read) == ("ultrafeedback", "train_prefs", 34)
    assert _reasons(loaded) == [
        (30, "chosen equals rejected"), (31, "missing rejected"), (32, "missing chosen")]
    assert loaded.duplicates == 1
    assert [e.source_row for e in loaded.examples] == list(range(30))
    for e in loaded.examples:
        row = rows[e.source_row]
        assert e.messages == [{"role": "user", "content": row["prompt"]}]
        assert e.chosen == row["chosen"][-1]["content"]
        assert e.rejected == row["rejected"][-1]["content"]
        assert (e.score_chosen, e.score_rejected) == (row["score_chosen"], row["score_rejected"])
        assert e.source_id == row["prompt_id"]


def test_forcing_a_layout_that_does_not_fit(
    hub_parquet: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    path, _ = hub_parquet
    # The columns are there but hold message lists: every row says why it cannot be used.
    loaded = load_source(SourceSpec(path=str(path), layout="flat"))
    assert loaded.examples == []
    assert loaded.reason_counts() == {"wrong type: chosen": 34}

    # A column the layout reads is absent: refused before any row, with the columns named.
    with pytest.raises(SelmError) as err:
        load_source(SourceSpec(path=str(UF_1000), layout="sharegpt"))
    message = str(err.value)
    assert "'sharegpt'" in message and "'conversations'" in message
    assert "['prompt', 'chosen', 'rejected', 'source_index', 'metadata']" in message


# --- multi-turn conversations, ShareGPT, HH: handmade rows, every quarantine reason -----------

SYSTEM = {"role": "system", "content": "Be brief."}


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_conversation_layout(tmp_path: Path) -> None:
    prefix = [SYSTEM, _turn("user", "Hi"), _turn("assistant", "Hello."), _turn("user", "2+2?")]
    rows = [
        {"chosen": [*prefix, _turn("assistant", "4")],
         "rejected": [*prefix, _turn("assistant", "5")], "score_chosen": 9, "score_rejected": 2.5},
        {"chosen": [_turn("user", "a"), _turn("assistant", "x")],
         "rejected": [_turn("user", "b"), _turn("assistant", "y")]},
        {"chosen": [_turn("user", "q"), _turn("assistant", "x"), _turn("user", "more")],
         "rejected": [_turn("user", "q"), _turn("assistant", "y")]},
        {"chosen": [_turn("user", "q"), _turn("assistant", "x")], "rejected": None},
        {"chosen": [_turn("user", "q"), _turn("assistant", " \n")],
         "rejected": [_turn("user", "q"), _turn("assistant", "y")]},
        {"chosen": [_turn("user", "q"), _turn("assistant", "same")],
         "rejected": [_turn("user", "q"), _turn("assistant", "same ")]},
        {"chosen": [SYSTEM, _turn("user", "  "), _turn("assistant", "x")],
         "rejected": [SYSTEM, _turn("user", "  "), _turn("assistant", "y")]},
        {"chosen": "not a conversation", "rejected": [_turn("user", "q"), _turn("assistant", "y")]},
        {"chosen": [_turn("user", "q"), _turn("assistant", "x")],
         "rejected": [_turn("user", "q"), _turn("assistant", "y")], "score_chosen": "high"},
        {"chosen": [*prefix, _turn("assistant", "four")],
         "rejected": [*prefix, _turn("assistant", "22")]},
        {"chosen": [_turn("user", "q"), _turn("assistant", "x")],
         "rejected": [_turn("user", "q"), _turn("assistant", "y")]},
    ]
    loaded = load_source(SourceSpec(path=str(_write_jsonl(tmp_path / "conv.jsonl", rows))))

    assert loaded.layout == "conversation"
    assert _reasons(loaded) == [
        (1, "prompts differ"),
        (2, "no assistant turn"),
        (3, "missing rejected"),
        (4, "missing chosen"),
        (5, "chosen equals rejected"),
        (6, "empty prompt"),
        (7, "wrong type: chosen"),
        (8, "wrong type: score_chosen"),
    ]
    assert loaded.duplicates == 1  # row 9 asks row 0's question again
    first, last = loaded.examples
    assert (first.source_row, first.messages, first.chosen, first.rejected) == (0, prefix, "4", "5")
    assert (first.score_chosen, first.score_rejected, first.source_id) == (9.0, 2.5, None)
    assert (last.source_row, last.messages, last.score_chosen) == (10, [_turn("user", "q")], None)


def _gpt(value: str | None) -> dict:
    return {"from": "gpt", "value": value}


def test_sharegpt_layout(tmp_path: Path) -> None:
    ask = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
           {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"}]
    ask_openai_names = [{"from": "user", "value": "q"}]
    rows = [
        {"conversations": ask, "chosen": _gpt("4"), "rejected": _gpt("5")},
        {"conversations": ask_openai_names, "chosen": {"from": "assistant", "value": "x"},
         "rejected": _gpt("y")},
        {"conversations": ask_openai_names, "chosen": {"from": "human", "value": "x"},
         "rejected": _gpt("y")},
        {"conversations": ask_openai_names, "chosen": None, "rejected": _gpt("y")},
        {"conversations": ask_openai_names, "chosen": _gpt("x"), "rejected": _gpt("")},
        {"conversations": [{"from": "observation", "value": "42"}], "chosen": _gpt("x"),
         "rejected": _gpt("y")},
        {"conversations": [{"from": "system", "value": "Be brief."}], "chosen": _gpt("x"),
         "rejected": _gpt("y")},
        {"conversations": ask_openai_names, "chosen": _gpt("same"), "rejected": _gpt("same")},
        {"conversations": ask_openai_names, "chosen": _gpt("x"), "rejected": "y"},
        {"conversations": [{"from": "human", "value": "q"}], "chosen": _gpt("z"),
         "rejected": _gpt("w")},
    ]
    loaded = load_source(SourceSpec(path=str(_write_jsonl(tmp_path / "sharegpt.jsonl", rows))))

    assert loaded.layout == "sharegpt"
    assert _reasons(loaded) == [
        (2, "no assistant turn"),
        (3, "missing chosen"),
        (4, "missing rejected"),
        (5, "wrong type: conversations"),
        (6, "empty prompt"),
        (7, "chosen equals rejected"),
        (8, "wrong type: rejected"),
    ]
    assert loaded.duplicates == 1  # "human" and "user" are the same role: row 9 repeats row 1
    first, second = loaded.examples
    assert first.messages == [SYSTEM, _turn("user", "Hi"), _turn("assistant", "Hello."),
                              _turn("user", "2+2?")]
    assert (first.chosen, first.rejected, first.score_chosen) == ("4", "5", None)
    assert (second.source_row, second.messages, second.chosen) == (1, [_turn("user", "q")], "x")


def test_hh_layout(tmp_path: Path) -> None:
    talk = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: "
    rows = [
        {"chosen": talk + "Fine, thanks.", "rejected": talk + "Go away."},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        {"chosen": "Just some text.", "rejected": "\n\nHuman: A\n\nAssistant: y"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: And?",
         "rejected": "\n\nHuman: A\n\nAssistant: y"},
        {"chosen": "\n\nHuman: A\n\nAssistant:", "rejected": "\n\nHuman: A\n\nAssistant: y"},
        {"chosen": "\n\nHuman: A\n\nAssistant: same",
         "rejected": "\n\nHuman: A\n\nAssistant: same"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": 42},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": None},
        {"chosen": "\n\nHuman: \n\nAssistant: x", "rejected": "\n\nHuman: \n\nAssistant: y"},
        {"chosen": talk + "Good.", "rejected": talk + "Bad."},
    ]
    loaded = load_source(SourceSpec(path=str(_write_jsonl(tmp_path / "hh.jsonl", rows))))

    assert loaded.layout == "hh"
    assert _reasons(loaded) == [
        (1, "prompts differ"),
        (2, "unparseable transcript"),
        (3, "no assistant turn"),
        (4, "missing chosen"),
        (5, "chosen equals rejected"),
        (6, "wrong type: rejected"),
        (7, "missing rejected"),
        (8, "empty prompt"),
    ]
    assert loaded.duplicates == 1
    (only,) = loaded.examples
    assert only.messages == [_turn("user", "Hi"), _turn("assistant", "Hello!"),
                             _turn("user", "How are you?")]
    assert (only.chosen, only.rejected) == ("Fine, thanks.", "Go away.")


# --- dedup, detection, errors ---------------------------------------------------------------


def test_identical_prompts_are_counted_and_the_first_is_kept() -> None:
    rows = [
        {"prompt": "b", "chosen": "same", "rejected": "same"},  # unusable: not a first occurrence
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "x", "rejected": "y"},
        {"prompt": "a", "chosen": "other", "rejected": "answers"},
        {"prompt": "a ", "chosen": "x", "rejected": "y"},  # another prompt: messages differ
        {"prompt": "a", "chosen": "x", "rejected": "y"},
    ]
    loaded = normalise(rows, "auto", source="handmade", split="train", revision=None)

    assert loaded.layout == "flat"
    assert [(e.source_row, e.messages[0]["content"]) for e in loaded.examples] == [
        (1, "a"), (2, "b"), (4, "a ")]
    assert (loaded.duplicates, _reasons(loaded)) == (2, [(0, "chosen equals rejected")])


def test_layouts_match_the_manifest() -> None:
    in_manifest = set(get_args(SourceSpec.model_fields["layout"].annotation))
    assert in_manifest == {*LAYOUTS, "auto"}
    assert set(PARSERS) == set(REQUIRED) == set(LAYOUT_HELP) == set(LAYOUTS)


def test_detect_layout() -> None:
    msgs = [_turn("user", "q"), _turn("assistant", "a")]
    assert detect_layout(["conversations", "chosen", "rejected"], {}) == "sharegpt"
    row = {"prompt": "q", "chosen": msgs, "rejected": msgs}
    assert detect_layout(list(row), row) == "ultrafeedback"
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert detect_layout(list(row), row) == "flat"
    missing = {"chosen": None, "rejected": msgs}  # the first row's chosen is missing
    assert detect_layout(list(missing), missing) == "conversation"
    row = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    assert detect_layout(list(row), row) == "hh"
    with pytest.raises(SelmError, match=r"columns \['chosen', 'rejected'\].*Known layouts"):
        detect_layout(["chosen", "rejected"], {"chosen": "a", "rejected": "b"})


def test_undetectable_layout_names_the_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SelmError) as err:
        load_source(SourceSpec(path=str(path)))
    message = str(err.value)
    assert "['question', 'answer']" in message
    for layout in ("ultrafeedback", "flat", "conversation", "sharegpt", "hh", "source.layout"):
        assert layout in message


def test_json_array_file_takes_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}]), "utf-8")
    loaded = load_source(SourceSpec(path=str(path)))
    assert [(e.messages, e.chosen, e.rejected) for e in loaded.examples] == [
        ([_turn("user", "q")], "a", "b")]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(SelmError, match="does not exist") as err:
        load_source(SourceSpec(path=str(path)))
    assert str(path) in str(err.value)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\n", encoding="utf-8")
    with pytest.raises(SelmError, match=r"'\.csv'; supported: jsonl, json or parquet") as err:
        load_source(SourceSpec(path=str(path)))
    assert str(path) in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.touch()
    with pytest.raises(SelmError, match="is empty"):
        load_source(SourceSpec(path=str(path)))


def test_unreadable_file_chains_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "q", "chosen": \n', encoding="utf-8")
    with pytest.raises(SelmError, match="could not load dataset") as err:
        load_source(SourceSpec(path=str(path)))
    assert str(path) in str(err.value) and err.value.__cause__ is not None


def test_unreachable_hub_chains_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode fails at once, where a missing network retries for about 20 s first.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = SourceSpec(hub="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    with pytest.raises(SelmError, match="could not load dataset 'HuggingFaceH4/") as err:
        load_source(spec)
    assert isinstance(err.value.__cause__, ConnectionError)
    assert "train_prefs" in str(err.value)


def test_no_rows() -> None:
    with pytest.raises(SelmError, match="has no rows"):
        normalise([], "flat", source="empty", split="train", revision=None)
