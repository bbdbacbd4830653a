"""Sources: a preference dataset, loaded through `datasets` and normalised to one schema.

A Hub id and a local jsonl/json/parquet file take the same code path (`datasets.load_dataset`),
so what the tests run on local files is what a user runs against the Hub. Five layouts are read
into one `Example` shape (prompt as chat messages, chosen, rejected, optional scores, source
row). A row that cannot be used is never dropped silently: it goes to `quarantined` with a reason
from a short fixed vocabulary, and repeated prompts are counted in `duplicates`, so
`rows_read == len(examples) + len(quarantined) + duplicates` always holds.

Quarantine reasons: "missing chosen", "missing rejected" (absent, null or blank), "empty prompt"
(no user turn with text), "chosen equals rejected", "prompts differ" (chosen and rejected
disagree on the turns before the answer), "no assistant turn" (a side does not end with an
assistant turn), "unparseable transcript" (HH text without Human/Assistant markers) and
"wrong type: <field>". A row gets the first reason that applies.
"""

from __future__ import annotations

import glob
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal, get_args

from selm_data.errors import SelmError
from selm_data.manifest import BUNDLED_DATA, SourceSpec
from selm_data.store.schema import canonical_json

Layout = Literal["ultrafeedback", "flat", "conversation", "sharegpt", "hh"]
LAYOUTS: tuple[Layout, ...] = get_args(Layout)
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> datasets builder
# datasets decompresses json(l) files by these suffixes (.zst needs zstandard); Parquet
# compresses inside the file.
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED = ("jsonl, json or parquet files (jsonl and json also as .gz, .bz2, .xz or .zst), a "
             "folder of them, or a glob such as 'shards/*.parquet'")
GLOB_CHARS = re.compile(r"[*?\[]")
DETAIL_CHARS = 200  # a quarantine detail is an excerpt to recognise the row, not a copy of it

LAYOUT_HELP = {
    "ultrafeedback": "prompt + chosen/rejected as lists of {role, content} messages",
    "flat": "prompt, chosen, rejected as strings",
    "conversation": "chosen/rejected as lists of {role, content} messages, no prompt column",
    "sharegpt": "conversations [{from, value}] + chosen/rejected {from, value}",
    "hh": 'chosen/rejected transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..."',
}
# Columns each layout reads: a forced layout whose columns are absent is refused before any row.
REQUIRED: dict[Layout, tuple[str, ...]] = {
    "ultrafeedback": ("chosen", "rejected"),
    "flat": ("prompt", "chosen", "rejected"),
    "conversation": ("chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
# LLaMA-Factory writes human/gpt; some exports write the OpenAI role names instead.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
HH_MARKER = re.compile(r"\n\n(Human|Assistant): ?")  # the space is absent after an empty turn


@dataclass(frozen=True)
class Example:
    """One usable preference row: the prompt turns and the two answers to them."""

    messages: list[Message]  # the prompt turns, system turn included; the assistant answers follow
    chosen: str
    rejected: str
    score_chosen: float | None
    score_rejected: float | None
    source_row: int  # 0-based row in the loaded split
    source_id: str | None = None  # the dataset's own row id: prompt_id or source_index


@dataclass(frozen=True)
class Quarantined:
    """A row that cannot be used, and why: kept so that nothing vanishes unexplained."""

    source_row: int
    reason: str
    detail: str


@dataclass(frozen=True)
class LoadedSource:
    """A normalised source: usable examples in source order, plus every row set aside."""

    source: str  # Hub id or file path
    split: str
    revision: str | None
    layout: Layout
    rows_read: int
    examples: list[Example]  # first occurrence of each prompt, in source order
    quarantined: list[Quarantined]
    duplicates: int  # usable rows dropped because an earlier example has the same messages

    def __post_init__(self) -> None:
        accounted = len(self.examples) + len(self.quarantined) + self.duplicates
        assert accounted == self.rows_read, f"{accounted} rows accounted for of {self.rows_read}"

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(q.reason for q in self.quarantined))


class _Reject(Exception):
    """Internal: a row goes to quarantine. Never leaves this module."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail[:DETAIL_CHARS]


# --- loading --------------------------------------------------------------------------------


def load_source(spec: SourceSpec) -> LoadedSource:
    """Load `spec` through `datasets`, keep its first `limit` rows, and normalise them.

    Raises:
        SelmError: the file is missing or of an unsupported kind, the dataset cannot be loaded
            (the cause is chained), or its layout cannot be told or does not fit its columns.
    """
    source, dataset = _load(spec)
    if spec.limit is not None:
        dataset = dataset.select(range(min(spec.limit, len(dataset))))
    return normalise(dataset, spec.layout, source=source, split=spec.split, revision=spec.revision)


def _load(spec: SourceSpec) -> tuple[str, Any]:
    try:
        import datasets  # an optional extra: only loading a source needs it
    except ImportError as e:
        raise SelmError("loading a source needs `datasets`: pip install 'selm[hub]'") from e
    if spec.hub is not None:
        source, builder, options = hub_source(spec)
        hint = ("check the id, config, data_dir, data_files, split and revision, and that the "
                "Hub is reachable")
    else:
        source = str(BUNDLED_DATA / spec.bundled) if spec.bundled is not None else str(spec.path)
        builder, files = local_files(source)
        # The files' one split is named after `split`, so the split recorded is the one asked for.
        options = {"data_files": {spec.split: [str(f) for f in files]}}
        hint = f"check that the file(s) are valid {builder}"
    try:
        return source, datasets.load_dataset(builder, split=spec.split, **options)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as e:
        message = f"could not load dataset {source!r} (split {spec.split!r}): {e}; {hint}"
        raise SelmError(message) from e


def hub_source(spec: SourceSpec) -> tuple[str, str, dict[str, Any]]:
    """The label recorded as the prompts' `source`, and `load_dataset`'s arguments, of a Hub
    source: `Anthropic/hh-rlhf/harmless-base` for a data_dir, `id:config` for a config."""
    assert spec.hub is not None
    label = spec.hub + (f":{spec.config}" if spec.config else "") + (
        f"/{spec.data_dir.strip('/')}" if spec.data_dir else "")
    data_files = spec.data_files
    if isinstance(data_files, str | list):  # datasets would name a bare list's split "train"
        data_files = {spec.split: data_files}
    options = {"revision": spec.revision, "name": spec.config, "data_dir": spec.data_dir,
               "data_files": data_files}
    # A local folder by its absolute path: datasets cannot name a dataset after "."
    where = str(Path(spec.hub).resolve()) if Path(spec.hub).is_dir() else spec.hub
    return label, where, {k: v for k, v in options.items() if v is not None}


def builder_of(path: Path) -> str | None:
    """The `datasets` builder that reads `path` ("json", "parquet"), None if none does."""
    suffix = path.suffix
    if suffix in COMPRESSIONS:
        suffix = Path(path.stem).suffix
        return "json" if BUILDERS.get(suffix) == "json" else None
    return BUILDERS.get(suffix)


def local_files(text: str) -> tuple[str, list[Path]]:
    """A local file, a folder of shards or a glob as `datasets` builder and files, in sorted
    order (so `source_row` and the portions do not depend on the filesystem's listing order).

    Raises:
        SelmError: nothing matches, a file is of an unsupported kind or empty, or the files
            mix formats.
    """
    path = Path(text)
    if GLOB_CHARS.search(text) and not path.exists():
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        where = f"no file matches {text!r}"
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and builder_of(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        where = f"folder {text!r} holds no data file"
    elif path.is_file():
        files, where = [path], ""
    else:
        raise SelmError(f"source {text!r} does not exist (relative paths are relative to the "
                        f"working directory, {Path.cwd()}); give {SUPPORTED}")
    if not files:
        raise SelmError(f"{where}; give {SUPPORTED}")
    builders = {f: builder_of(f) for f in files}
    unknown = [str(f) for f, b in builders.items() if b is None]
    if unknown:
        suffix = "".join(Path(unknown[0]).suffixes)
        raise SelmError(f"source file {unknown[0]!r} has suffix {suffix!r}; supported: "
                        f"{SUPPORTED}")
    kinds = set(builders.values())
    if len(kinds) > 1:
        raise SelmError(f"source {text!r} mixes {' and '.join(sorted(map(str, kinds)))} files; "
                        "give files of one format (a glob such as 'data/*.parquet' picks them)")
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:  # datasets 5.2 raises a bare StopIteration on an empty file
        raise SelmError(f"source file {empty[0]!r} is empty")
    return str(kinds.pop()), files


# --- layout ---------------------------------------------------------------------------------


def detect_layout(columns: Sequence[str], first_row: Mapping[str, Any]) -> Layout:
    """The layout of a dataset, told from its column names and the types in its first row.

    Raises:
        SelmError: no layout fits; the message lists the columns seen and the layouts known.
    """
    cols = set(columns)
    if "conversations" in cols:
        return "sharegpt"
    if {"chosen", "rejected"} <= cols:
        sample = first_row.get("chosen")
        sample = first_row.get("rejected") if sample is None else sample
        if isinstance(sample, list):
            return "ultrafeedback" if "prompt" in cols else "conversation"
        if isinstance(sample, str) and "prompt" in cols:
            return "flat"
        if isinstance(sample, str) and "\n\nHuman:" in sample:
            return "hh"
    known = "; ".join(f"{name}: {text}" for name, text in LAYOUT_HELP.items())
    raise SelmError(
        f"cannot tell the layout of a dataset with columns {list(columns)}. Known layouts: "
        f"{known}. Set source.layout to the one that fits, or convert the data to one of them"
    )


def _check_columns(layout: Layout, columns: Sequence[str]) -> None:
    missing = [c for c in REQUIRED[layout] if c not in columns]
    if missing:
        raise SelmError(
            f"layout {layout!r} ({LAYOUT_HELP[layout]}) reads columns {list(REQUIRED[layout])}, "
            f"but the dataset has {list(columns)} (missing {missing}); set source.layout to the "
            "layout of the data, or to 'auto'"
        )


# --- normalising ----------------------------------------------------------------------------


def normalise(
    rows: Iterable[Mapping[str, Any]],
    layout: Layout | Literal["auto"],
    *,
    source: str,
    split: str,
    revision: str | None,
) -> LoadedSource:
    """Rows of one split as examples, quarantined rows and a count of repeated prompts.

    Identical prompts are identical `messages` (the prompts table's identity): the first
    occurrence is kept.

    Raises:
        SelmError: there are no rows, or the layout cannot be told or lacks its columns.
    """
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        raise SelmError(f"dataset {source!r} (split {split!r}) has no rows")
    columns = list(first)
    if layout == "auto":
        layout = detect_layout(columns, first)
    else:
        _check_columns(layout, columns)
    examples: list[Example] = []
    quarantined: list[Quarantined] = []
    seen: set[str] = set()
    duplicates = rows_read = 0
    for i, row in enumerate(chain([first], iterator)):
        rows_read += 1
        try:
            example = _example(row, layout, i)
        except _Reject as r:
            quarantined.append(Quarantined(i, r.reason, r.detail))
            continue
        key = canonical_json(example.messages)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        examples.append(example)
    return LoadedSource(source, split, revision, layout, rows_read, examples, quarantined,
                        duplicates)


def _example(row: Mapping[str, Any], layout: Layout, i: int) -> Example:
    messages, chosen, rejected = PARSERS[layout](row)
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise _Reject("empty prompt", f"prompt turns: {messages!r}")
    if chosen.strip() == rejected.strip():
        raise _Reject("chosen equals rejected", repr(chosen))
    return Example(messages, chosen, rejected, _score(row, "score_chosen"),
                   _score(row, "score_rejected"), i, _source_id(row))


Parsed = tuple[list[Message], str, str]  # prompt turns, chosen text, rejected text


def _flat(row: Mapping[str, Any]) -> Parsed:
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _Reject("wrong type: prompt", f"prompt is {type(prompt).__name__}")
    messages = [{"role": "user", "content": prompt or ""}]
    return messages, _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")


def _conversation(row: Mapping[str, Any]) -> Parsed:
    """UltraFeedback's and TRL's implicit-prompt layout: each side is the whole conversation."""
    return _split_answer(_messages(row.get("chosen"), "chosen"),
                         _messages(row.get("rejected"), "rejected"))


def _sharegpt(row: Mapping[str, Any]) -> Parsed:
    turns = row.get("conversations")
    turns = [] if turns is None else turns
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        raise _Reject("wrong type: conversations", "expected a list of {from, value} turns")
    for t in turns:
        role = t.get("from")  # any JSON value: a list or an object is not hashable
        if not isinstance(role, str) or role not in SHAREGPT_ROLES \
                or not isinstance(t.get("value"), str):
            raise _Reject("wrong type: conversations", f"turn {dict(t)!r}")
    messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    return messages, _sharegpt_answer(row.get("chosen"), "chosen"), _sharegpt_answer(
        row.get("rejected"), "rejected")


def _hh(row: Mapping[str, Any]) -> Parsed:
    return _split_answer(_transcript(row.get("chosen"), "chosen"),
                         _transcript(row.get("rejected"), "rejected"))


PARSERS = {"ultrafeedback": _conversation, "flat": _flat, "conversation": _conversation,
           "sharegpt": _sharegpt, "hh": _hh}


def _answer(value: Any, side: str) -> str:
    """An answer's text, unchanged; blank counts as missing because it teaches nothing."""
    if value is not None and not isinstance(value, str):
        raise _Reject(f"wrong type: {side}", f"{side} is {type(value).__name__}")
    if value is None or not value.strip():
        raise _Reject(f"missing {side}", "absent" if value is None else f"blank: {value!r}")
    return value


def _messages(value: Any, side: str) -> list[Message]:
    if value is None or (isinstance(value, list) and not value):
        raise _Reject(f"missing {side}", "absent" if value is None else "no messages")
    ok = isinstance(value, list) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise _Reject(f"wrong type: {side}", f"expected {{role, content}} messages: {value!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_answer(chosen: list[Message], rejected: list[Message]) -> Parsed:
    """Both sides are the prompt turns plus one final assistant answer; the turns must agree."""
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise _Reject("no assistant turn", f"{side} ends with a {turns[-1]['role']!r} turn")
    if chosen[:-1] != rejected[:-1]:
        raise _Reject("prompts differ", f"chosen prompt turns: {chosen[:-1]!r}")
    return (chosen[:-1], _answer(chosen[-1]["content"], "chosen"),
            _answer(rejected[-1]["content"], "rejected"))


def _sharegpt_answer(value: Any, side: str) -> str:
    if value is None:
        raise _Reject(f"missing {side}", "absent")
    if not isinstance(value, Mapping):
        raise _Reject(f"wrong type: {side}", f"{side} is {type(value).__name__}, not a turn")
    if SHAREGPT_ROLES.get(str(value.get("from"))) != "assistant":
        raise _Reject("no assistant turn", f"{side} is from {value.get('from')!r}")
    return _answer(value.get("value"), side)


def _transcript(value: Any, side: str) -> list[Message]:
    """Anthropic HH text: turns introduced by "\\n\\nHuman: " and "\\n\\nAssistant: "."""
    if value is None:
        raise _Reject(f"missing {side}", "absent")
    if not isinstance(value, str):
        raise _Reject(f"wrong type: {side}", f"{side} is {type(value).__name__}")
    parts = HH_MARKER.split(value)  # [text before the first marker, role, text, role, text, ...]
    if len(parts) < 3 or parts[0].strip():
        raise _Reject("unparseable transcript", f"{side}: {value!r}")
    return [{"role": "user" if role == "Human" else "assistant", "content": text}
            for role, text in zip(parts[1::2], parts[2::2], strict=True)]


def _score(row: Mapping[str, Any], name: str) -> float | None:
    """A score at the top level (the Hub's UltraFeedback) or under `metadata` (the flat file)."""
    value = row.get(name)
    metadata = row.get("metadata")
    if value is None and isinstance(metadata, Mapping):
        value = metadata.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject(f"wrong type: {name}", f"{name} is {type(value).__name__}: {value!r}")
    return float(value)


def _source_id(row: Mapping[str, Any]) -> str | None:
    for key in ("prompt_id", "source_index"):
        if row.get(key) is not None:
            return str(row[key])
    return None
