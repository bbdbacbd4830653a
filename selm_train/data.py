"""Training data: a snapshot read, tokenised with the policy's chat template, and batched so that
chosen, rejected and y_ref go through the model in one forward pass.

    resolve_snapshot("STORE@NAME" or FOLDER) -> SnapshotRef   (files verified against the hash)
    read_examples(ref)                        -> [PreferenceExample]  (both layouts, one shape)
    tokenize(examples, tokenizer)             -> [TokenizedExample]   (ids, truncated)
    collate(batch, pad_token_id, ...)         -> Batch  rows [chosen.., rejected.., y_ref..]
                                                         (a response equal to another: one row)

Tokenisation (as TRL's DPOTrainer does for conversational data): the prompt is the chat
template of the prompt turns with the generation prompt (the assistant header), and a response
is the template of prompt + answer minus that prefix. So the response carries the end-of-turn
tokens the template writes after an assistant message (ChatML: `<|im_end|>` and a newline): the
model learns to stop. No BOS or EOS is added beyond what the template writes.

Truncation (the paper's settings: max length 1024, max prompt 512, `truncation_mode=keep_end`),
one rule for all three responses of a pair, so y_ref never overflows: with L the longest of
chosen, rejected and y_ref, if prompt + L > max_length the prompt keeps its last
max_prompt_length tokens; if still too long, every response keeps its first
max_length - len(prompt) tokens. The public SELM code (shenao-zhang/SELM,
scripts/selm_trainer.py `tokenize_row`) sized L from chosen and rejected only, and tested y_ref
against that L, so a long y_ref was never cut.

Nothing here is random or global: the same snapshot and tokenizer give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from selm_data.errors import SelmError
from selm_data.publish.snapshot import (
    LAYOUTS,
    Layout,
    files_hash,
    local_folder,
    snapshot_names,
    snapshot_row,
)
from selm_data.store.schema import SNAPSHOTS, row_id
from selm_data.store.store import MARKER, open_store

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Batch", "PreferenceExample", "SnapshotRef", "TokenizedExample", "collate", "read_examples",
    "resolve_snapshot", "tokenize", "truncate",
]

Message = dict[str, str]


# --- resolving a snapshot -------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot whose files were checked against its content hash."""

    folder: Path
    name: str
    snapshot_id: str  # the id the store gives it: row_id over (name, content_hash)
    content_hash: str
    iteration: int
    layout: Layout
    files: tuple[str, ...]  # relative to folder
    row_count: int
    # the store it was named through (STORE@NAME): a folder, or an object-store URI; else None
    store: Path | str | None
    policy_pair: bool = False  # rows carry SAIL's policy pair (pairing.rule sail)


def resolve_snapshot(ref: str) -> SnapshotRef:
    """The snapshot `ref` names: a snapshot folder (with snapshot.json) or `STORE@NAME`.

    Its files are rehashed here, before any training: a model must never be trained, and its
    lineage recorded, on data other than what the snapshot's hash says.

    Raises:
        SelmError: a bad reference, an unknown name (the known ones are listed), a missing
            folder or file, or files that no longer match the content hash.
    """
    path = Path(ref).expanduser()
    if (path / "snapshot.json").is_file():
        return _verified(path.absolute(), store=None, row=None)
    if "@" in ref:
        store_part, _, name = ref.rpartition("@")
        if not store_part or not name:
            raise SelmError(f"snapshot reference {ref!r}: write STORE@NAME (a store folder and a "
                            "snapshot name, e.g. runs/store@iter1-ab12cd34) or a snapshot folder")
        return _from_store(store_part, name)
    if (path / MARKER).is_file():
        raise SelmError(f"{ref} is a selm store, not a snapshot: name one in it as {ref}@NAME "
                        f"(known: {snapshot_names(open_store(path))})")
    if path.is_dir():
        raise SelmError(f"{ref} has no snapshot.json, so it is not a snapshot folder; give the "
                        "folder `selm-data export` printed, or STORE@NAME")
    raise SelmError(f"no snapshot at {ref}: give a snapshot folder (with snapshot.json) or "
                    "STORE@NAME; `selm-data status --store STORE` lists a store's snapshots")


def _from_store(store_path: str, name: str) -> SnapshotRef:
    store = open_store(store_path)
    row = snapshot_row(store, name)
    if store.location.local is None:  # object store: read a hash-checked local copy
        return _verified(local_folder(store, row), store=store.uri, row=row)
    folder = store.root / row["path"]  # relative to the store root, so stores can move
    if not (folder / "snapshot.json").is_file():
        raise SelmError(f"snapshot {name!r} is registered in {store.root} but {folder} has no "
                        "snapshot.json: run `selm-data verify`, then export it again under a "
                        "new name")
    return _verified(folder, store=store.root, row=row)


def _verified(folder: Path, *, store: Path | str | None,
              row: dict[str, Any] | None) -> SnapshotRef:
    """Read snapshot.json, check it against the store row (if any) and rehash the files."""
    try:
        meta = json.loads((folder / "snapshot.json").read_text())
        name, content_hash, files = meta["name"], meta["content_hash"], list(meta["files"])
        iteration, row_count = int(meta["iteration"]), int(meta["row_count"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SelmError(f"{folder / 'snapshot.json'} is not a selm snapshot description "
                        f"({e!r}); export the snapshot again with `selm-data export`") from e
    layout = meta.get("layout", "ultrafeedback")  # snapshots before layouts were ultrafeedback
    if layout not in LAYOUTS:
        raise SelmError(f"{folder / 'snapshot.json'}: layout {layout!r} is not one of "
                        f"{', '.join(LAYOUTS)}; this selm cannot read it")
    snapshot_id = row_id(SNAPSHOTS, {"name": name, "content_hash": content_hash})
    fix = ("snapshots are immutable: export the iteration again under a new name "
           f"(`selm-data export --iter {iteration} --name NEW`) and train on that")
    if row is not None and (row["name"], row["content_hash"], row["snapshot_id"]) != (
            name, content_hash, snapshot_id):
        raise SelmError(f"snapshot {row['name']!r}: {folder / 'snapshot.json'} describes "
                        f"{name!r} with hash {content_hash[:12]}, the store registered hash "
                        f"{row['content_hash'][:12]}; the folder was replaced: {fix}")
    missing = [rel for rel in files if not (folder / rel).is_file()]
    if missing:
        raise SelmError(f"snapshot {name!r}: {folder / missing[0]} is missing; {fix}")
    if files_hash(folder, files) != content_hash:
        raise SelmError(f"snapshot {name!r} at {folder}: its files no longer match its content "
                        f"hash {content_hash[:12]}, so it was modified after export; {fix}")
    return SnapshotRef(folder, name, snapshot_id, content_hash, iteration, layout, tuple(files),
                       row_count, store, bool(meta.get("policy_pair", False)))


# --- reading examples -----------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceExample:
    """One pair, layout-free: the prompt turns and the three answers as plain text."""

    pair_id: str
    prompt: list[Message]  # chat messages {role, content}, ending before the answer
    chosen: str
    rejected: str
    reference: str | None  # y_ref; None in iterations trained on the dataset's own pairs
    # SAIL's policy pair (two samples of the policy, the better first by the ranker), and
    # whether that order is the samples' reverse; None where the snapshot has none
    policy_chosen: str | None = None
    policy_rejected: str | None = None
    policy_swapped: bool = False


def read_examples(snapshot: SnapshotRef) -> list[PreferenceExample]:
    """The snapshot's pairs in file order (sorted by pair_id), both layouts normalised.

    ultrafeedback: `chosen` / `rejected` / `reference` are whole conversations; the prompt is
    everything before the last turn, and must be the same in all three. trl: `prompt` holds the
    prompt turns and each answer column the one assistant turn. A snapshot of an iteration built
    with `pairing.rule: sail` also gives each example its policy pair (`policy_chosen`, ...).
    """
    columns = ["pair_id", "chosen", "rejected", "reference"]
    if snapshot.layout == "trl":
        columns.append("prompt")
    if snapshot.policy_pair:
        columns += ["policy_chosen", "policy_rejected", "policy_swapped"]
    tables = [pq.read_table(snapshot.folder / rel, columns=columns) for rel in snapshot.files]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    if len(rows) != snapshot.row_count:
        raise SelmError(f"snapshot {snapshot.name!r} holds {len(rows)} rows, its snapshot.json "
                        f"says {snapshot.row_count}; export it again under a new name")
    normalise = _from_trl if snapshot.layout == "trl" else _from_ultrafeedback
    return [normalise(row) for row in rows]


def _answers(row: dict[str, Any], prompt: list[Message], pair_id: str, *,
             whole: bool) -> tuple[str, str, str | None, str | None, str | None]:
    """chosen, rejected, reference and the policy pair's answers of a row; `whole`: each column
    is the conversation (ultrafeedback), else the one assistant turn (trl)."""
    answers: dict[str, str] = {}
    for column in ANSWER_COLUMNS:
        if column not in ("chosen", "rejected") and row.get(column) is None:
            continue
        turns = _turns(row[column], column, pair_id)
        if whole and turns[:-1] != prompt:
            raise SelmError(f"pair {pair_id}: `{column}` does not start with the prompt turns of "
                            "`chosen`; the snapshot is inconsistent, export it again")
        if not whole and len(turns) != 1:
            raise SelmError(f"pair {pair_id}: `{column}` has {len(turns)} turns; the trl layout "
                            "holds exactly one assistant turn per answer")
        answers[column] = _answer(turns, column, pair_id)
    if ("policy_chosen" in answers) != ("policy_rejected" in answers):
        raise SelmError(f"pair {pair_id}: one answer of the policy pair is missing; the "
                        "snapshot is inconsistent, export it again")
    return (answers["chosen"], answers["rejected"], answers.get("reference"),
            answers.get("policy_chosen"), answers.get("policy_rejected"))


ANSWER_COLUMNS = ("chosen", "rejected", "reference", "policy_chosen", "policy_rejected")


def _from_ultrafeedback(row: dict[str, Any]) -> PreferenceExample:
    pair_id = row["pair_id"]
    prompt = _turns(row["chosen"], "chosen", pair_id)[:-1]
    if not prompt:
        raise SelmError(f"pair {pair_id}: `chosen` has no prompt turns before the answer")
    return PreferenceExample(pair_id, prompt, *_answers(row, prompt, pair_id, whole=True),
                             bool(row.get("policy_swapped")))


def _from_trl(row: dict[str, Any]) -> PreferenceExample:
    pair_id = row["pair_id"]
    prompt = _turns(row["prompt"], "prompt", pair_id)
    return PreferenceExample(pair_id, prompt, *_answers(row, prompt, pair_id, whole=False),
                             bool(row.get("policy_swapped")))


def _turns(value: Any, column: str, pair_id: str) -> list[Message]:
    if not value or any(m is None or m.get("content") is None or not m.get("role")
                        for m in value):
        raise SelmError(f"pair {pair_id}: `{column}` is empty or has a message without role or "
                        "content; the snapshot is malformed, export it again")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(turns: list[Message], column: str, pair_id: str) -> str:
    if turns[-1]["role"] != "assistant":
        raise SelmError(f"pair {pair_id}: the last turn of `{column}` is from "
                        f"{turns[-1]['role']!r}, not the assistant")
    return turns[-1]["content"]


# --- tokenising -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one pair: one prompt shared by the three responses."""

    pair_id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    ref_ids: tuple[int, ...] | None
    truncated: bool  # the prompt or the responses were cut to fit max_length
    policy_chosen_ids: tuple[int, ...] | None = None  # SAIL's policy pair, ranker's order
    policy_rejected_ids: tuple[int, ...] | None = None
    policy_swapped: bool = False  # the ranker's order is the samples' reverse


def tokenize(examples: Sequence[PreferenceExample], tokenizer: PreTrainedTokenizerBase, *,
             max_length: int = 1024, max_prompt_length: int = 512) -> list[TokenizedExample]:
    """Token ids through the tokenizer's chat template, truncated by the module's rule.

    A template may render the prompt alone (with the generation prompt) differently from the
    same prompt followed by an answer, or tokens may merge across the boundary. Then, as TRL
    does, the prompt is the longest prefix the prompt alone shares with all three full
    conversations, and each response is the rest of its conversation; one prompt for all three
    keeps them comparable.

    Raises:
        SelmError: max_prompt_length not in [1, max_length), a tokenizer without a chat
            template, or a response that renders to no tokens.
    """
    if not 0 < max_prompt_length < max_length:
        raise SelmError(f"max_prompt_length ({max_prompt_length}) must be at least 1 and below "
                        f"max_length ({max_length}), so that every response keeps a token")
    if not getattr(tokenizer, "chat_template", None):
        raise SelmError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                        "template; train from a chat model's folder, or set "
                        "`tokenizer.chat_template` and save it with the model")
    return [_tokenize_one(ex, tokenizer, max_length, max_prompt_length) for ex in examples]


def _tokenize_one(ex: PreferenceExample, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  max_prompt_length: int) -> TokenizedExample:
    prompt = _chat_ids(tokenizer, ex.prompt, generation_prompt=True)
    named = [(what, a) for what, a in zip(ANSWER_COLUMNS, (
        ex.chosen, ex.rejected, ex.reference, ex.policy_chosen, ex.policy_rejected),
        strict=True) if a is not None]
    full = [_chat_ids(tokenizer, [*ex.prompt, {"role": "assistant", "content": a}],
                      generation_prompt=False) for _, a in named]
    n = min(_common_prefix(prompt, ids) for ids in full)
    prompt, responses = prompt[:n], [ids[n:] for ids in full]
    for ids, (what, _) in zip(responses, named, strict=True):
        if not ids:
            raise SelmError(f"pair {ex.pair_id}: the {what} answer renders to no tokens after "
                            "the prompt with this chat template; nothing would be trained on it")
    prompt, responses, truncated = truncate(prompt, responses, max_length=max_length,
                                            max_prompt_length=max_prompt_length)
    by_what = {what: tuple(r) for (what, _), r in zip(named, responses, strict=True)}
    return TokenizedExample(ex.pair_id, tuple(prompt), by_what["chosen"], by_what["rejected"],
                            by_what.get("reference"), truncated, by_what.get("policy_chosen"),
                            by_what.get("policy_rejected"), ex.policy_swapped)


def truncate(prompt: list[int], responses: list[list[int]], *, max_length: int,
             max_prompt_length: int) -> tuple[list[int], list[list[int]], bool]:
    """The module's truncation rule: sized from the longest of ALL responses (y_ref and a
    policy pair included), prompt cut from the left (keep_end) first, then every response to
    the room left."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt, responses, False
    prompt = prompt[-max_prompt_length:]
    if len(prompt) + longest > max_length:
        responses = [r[: max_length - len(prompt)] for r in responses]
    return prompt, responses, True


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *,
              generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    if not isinstance(out, Mapping):  # return_dict=True: a BatchEncoding
        raise TypeError(f"apply_chat_template returned a {type(out).__name__}, not a mapping")
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --- batching -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Right-padded (prompt + response) rows for one forward pass, and where each example's
    responses are: `slots[k][i]` is the row of response k (chosen, rejected[, y_ref]) of
    example i, `pair_ids[i]` its pair (to look up cached reference log-probs).

    A response equal to another of its example (token for token, e.g. y_ref that became the
    chosen or rejected answer, as it does whenever the ranker put the new response first or
    last) has no row of its own: it points at the row it equals, so the model runs it once and
    its log-prob (and gradient) is the same number."""

    input_ids: Tensor  # (rows, T) long
    attention_mask: Tensor  # (rows, T) long, 1 on real tokens
    loss_mask: Tensor  # (rows, T) long, 1 exactly on response tokens
    pair_ids: tuple[str, ...]  # (B,)
    slots: tuple[tuple[int, ...], ...]  # (k, B): row of response k of example i

    def split(self, values: Tensor) -> tuple[Tensor, ...]:
        """Per-row values (rows, ...) -> (chosen, rejected[, y_ref]), each (B, ...)."""
        if values.shape[0] != self.input_ids.shape[0]:
            raise ValueError(f"expected {self.input_ids.shape[0]} rows, got {values.shape[0]}")
        return tuple(values[torch.tensor(slot, device=values.device)] for slot in self.slots)

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device),
                       loss_mask=self.loss_mask.to(device))


def collate(batch: Sequence[TokenizedExample], pad_token_id: int, *,
            with_reference: bool) -> Batch:
    """Stack chosen, rejected (and y_ref) sequences of `batch` into one right-padded batch:
    the chosen rows, the rejected rows, then the y_ref rows that equal neither.

    Right padding leaves every real token's logits as without padding under a causal mask.

    Raises:
        SelmError: `with_reference` and a pair without y_ref (the SELM loss needs it).
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    if with_reference:
        lacking = [ex.pair_id for ex in batch if ex.ref_ids is None]
        if lacking:
            raise SelmError(
                f"{len(lacking)} pair(s) have no reference response y_ref (e.g. {lacking[0]}), "
                "which the SELM loss trains on: this snapshot's iteration paired the dataset's "
                "own answers. Train it with loss dpo or ipo, or build the iteration with "
                "generation to get y_ref")
    blocks = ["chosen_ids", "rejected_ids"] + (["ref_ids"] if with_reference else [])
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    where: dict[tuple[int, tuple[int, ...]], int] = {}  # (example, response) -> row
    slots = []
    for block in blocks:
        slot = []
        for i, ex in enumerate(batch):
            response = getattr(ex, block)
            if (i, response) not in where:
                where[i, response] = len(rows)
                rows.append((ex.prompt_ids, response))
            slot.append(where[i, response])
        slots.append(tuple(slot))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n, total = len(prompt), len(prompt) + len(response)
        input_ids[i, :total] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :total] = 1
        loss_mask[i, n:total] = 1
    return Batch(input_ids, attention_mask, loss_mask, tuple(ex.pair_id for ex in batch),
                 tuple(slots))
