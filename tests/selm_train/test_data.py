"""Training data from snapshots: resolution and verification, both layouts, chat-template
tokenisation, truncation and the batched (chosen, rejected, y_ref) forward.

Expected values come from independent computations written here: the chat template applied in
the test, a character-level fake tokenizer whose lengths are plain string lengths, and
log-probabilities of each sequence computed alone, without padding, with the tiny model.
"""

from __future__ import annotations

import os

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from helpers import chain_rows, write_chain
from selm_data.errors import SelmError
from selm_data.publish.snapshot import export
from selm_data.store.schema import PAIRS, SNAPSHOTS, row_id
from selm_train.data import (
    Batch,
    PreferenceExample,
    SnapshotRef,
    TokenizedExample,
    collate,
    read_examples,
    resolve_snapshot,
    tokenize,
)
from selm_train.losses import sequence_logps

END = "<|im_end|>\n"  # what the ChatML template writes after every message


@pytest.fixture
def snapshots(store):
    """Iteration 1 with y_ref exported in both layouts; iteration 2 without y_ref (a dataset
    pairs-only iteration). write_chain also registers placeholder snapshots iter1/iter2 whose
    snapshot.json holds only an empty file list."""
    rows = chain_rows(1, 5)
    write_chain(store, rows)
    plain = chain_rows(2, 3)
    for pair in plain["pairs"]:
        pair["ref_id"] = None
    write_chain(store, plain)
    uf = export(store, 1, name="uf", layout="ultrafeedback")
    trl = export(store, 1, name="trl", layout="trl")
    noref = export(store, 2, name="noref", layout="ultrafeedback")
    return store, rows, {"uf": uf, "trl": trl, "noref": noref}


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture(scope="module")
def model(tiny_lm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()


# ---- resolving -----------------------------------------------------------------------------

def test_path_and_store_name_resolve_to_the_same_snapshot(snapshots):
    store, _, snaps = snapshots
    row = store.scan("snapshots").filter(pl.col("name") == "uf").collect().row(0, named=True)
    by_name = resolve_snapshot(f"{store.root}@uf")
    by_path = resolve_snapshot(str(snaps["uf"].path))
    assert by_name == SnapshotRef(
        folder=snaps["uf"].path, name="uf", snapshot_id=row["snapshot_id"],
        content_hash=snaps["uf"].content_hash, iteration=1, layout="ultrafeedback",
        files=tuple(snaps["uf"].files), row_count=5, store=store.root)
    assert by_path == SnapshotRef(**{**by_name.__dict__, "store": None})
    # the id is computable without the store: the row id over (name, content_hash)
    assert by_path.snapshot_id == row_id(SNAPSHOTS, {"name": "uf",
                                                     "content_hash": row["content_hash"]})
    assert resolve_snapshot(f"{store.root}@trl").layout == "trl"


def test_bad_references_say_what_to_do(snapshots, tmp_path):
    store, _, _ = snapshots
    root = store.root
    with pytest.raises(SelmError, match=r"no snapshot named 'nope'; known: iter1, iter2, "
                                        r"noref, trl, uf\. Export"):
        resolve_snapshot(f"{root}@nope")
    for ref in ("@uf", f"{root}@"):
        with pytest.raises(SelmError, match="write STORE@NAME"):
            resolve_snapshot(ref)
    with pytest.raises(SelmError, match=r"is a selm store, not a snapshot: name one in it as "
                                        r".*@NAME \(known: iter1"):
        resolve_snapshot(str(root))
    with pytest.raises(SelmError, match="no snapshot at"):
        resolve_snapshot(str(tmp_path / "missing"))
    with pytest.raises(SelmError, match=r"has no snapshot\.json"):
        resolve_snapshot(str(tmp_path))
    with pytest.raises(SelmError, match="no selm store at"):
        resolve_snapshot(f"{tmp_path / 'nostore'}@uf")
    # write_chain's placeholder: registered, but its snapshot.json describes nothing
    with pytest.raises(SelmError, match="not a selm snapshot description"):
        resolve_snapshot(f"{root}@iter1")


def test_a_modified_snapshot_is_refused(snapshots):
    store, _, snaps = snapshots
    snap = snaps["uf"]
    shard = snap.path / snap.files[0]
    table = pq.read_table(shard)
    shard.chmod(0o644)
    pq.write_table(table.slice(1), shard)
    for ref in (f"{store.root}@uf", str(snap.path)):
        with pytest.raises(SelmError, match=r"no longer match its content hash .* modified after "
                                            r"export; .*--iter 1 --name NEW"):
            resolve_snapshot(ref)
    os.chmod(snap.path / "data", 0o755)
    shard.unlink()
    with pytest.raises(SelmError, match=r"train-00000-of-00001.parquet is missing"):
        resolve_snapshot(str(snap.path))


# ---- reading -------------------------------------------------------------------------------

def test_both_layouts_read_and_tokenize_the_same(snapshots, tokenizer):
    store, rows, _ = snapshots
    uf = read_examples(resolve_snapshot(f"{store.root}@uf"))
    trl = read_examples(resolve_snapshot(f"{store.root}@trl"))
    assert uf == trl
    texts = {r["response_id"]: r["text"] for r in rows["responses"]}
    prompts = {r["prompt_id"]: r["messages"] for r in rows["prompts"]}
    pairs = {row_id_of(p): p for p in rows["pairs"]}
    assert [ex.pair_id for ex in uf] == sorted(pairs)
    for ex in uf:
        pair = pairs[ex.pair_id]
        assert ex == PreferenceExample(ex.pair_id, prompts[pair["prompt_id"]],
                                       texts[pair["chosen_id"]], texts[pair["rejected_id"]],
                                       texts[pair["ref_id"]])
    assert tokenize(uf, tokenizer) == tokenize(trl, tokenizer)
    noref = read_examples(resolve_snapshot(f"{store.root}@noref"))
    assert len(noref) == 3 and all(ex.reference is None for ex in noref)


def row_id_of(pair: dict) -> str:
    return row_id(PAIRS, pair)


# ---- tokenising ----------------------------------------------------------------------------

def template_text(tokenizer, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def test_ids_are_the_chat_template_with_the_end_of_turn_in_the_response(snapshots, tokenizer):
    store, _, _ = snapshots
    examples = read_examples(resolve_snapshot(f"{store.root}@uf"))
    multi = PreferenceExample("multi", [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"},
    ], "It is 4.", "Five, surely", "4")
    for ex, tok in zip([*examples, multi], tokenize([*examples, multi], tokenizer), strict=True):
        prompt_text = template_text(tokenizer, ex.prompt, add_generation_prompt=True)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert list(tok.prompt_ids) == tokenizer(prompt_text, add_special_tokens=False)[
            "input_ids"]
        for answer, ids in ((ex.chosen, tok.chosen_ids), (ex.rejected, tok.rejected_ids),
                            (ex.reference, tok.ref_ids)):
            assert tokenizer.decode(ids) == answer + END
            full = template_text(tokenizer, [*ex.prompt, {"role": "assistant",
                                                          "content": answer}])
            assert tokenizer.decode(tok.prompt_ids + ids) == full
        assert not tok.truncated


def test_a_template_whose_prompt_is_not_a_token_prefix_uses_the_common_prefix(tokenizer):
    """A template that opens a thought block in the generation prompt only (as some reasoning
    models do): the prompt keeps what it shares with the full conversations."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>{% endif %}")
    ex = PreferenceExample("p", [{"role": "user", "content": "Why?"}], "Because.", "No", None)
    (out,) = tokenize([ex], tok)
    shared = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(out.prompt_ids) == shared
    assert tok.decode(out.chosen_ids) == "Because." + END
    assert tok.decode(out.rejected_ids) == "No" + END and out.ref_ids is None


class CharTokenizer:
    """One id per character of a tiny template, so every length below is a string length."""

    chat_template = "<role>content|"

    def apply_chat_template(self, messages, *, tokenize, return_dict, add_generation_prompt):
        assert tokenize and return_dict
        text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
        return {"input_ids": chars(text + ("<a>" if add_generation_prompt else ""))}


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def example(prompt_chars: int, chosen: int, rejected: int, ref: int | None
            ) -> PreferenceExample:
    """Prompt ids: `<u>` + text + `|<a>`; each response: text + `|`. Lengths as given."""
    user = "".join(chr(ord("A") + i % 26) for i in range(prompt_chars - 7))
    def answer(n: int, c: str) -> str:
        return c * (n - 1)

    return PreferenceExample("p", [{"role": "user", "content": user}], answer(chosen, "c"),
                             answer(rejected, "r"), None if ref is None else answer(ref, "y"))


@pytest.mark.parametrize(("lengths", "prompt_kept", "kept", "truncated"), [
    # prompt + longest == max_length: nothing is cut
    ((20, 20, 5, 10), 20, (20, 5, 10), False),
    # y_ref is the longest: it alone makes the prompt lose its start (the paper's code, which
    # sized this from chosen/rejected only, would leave 30 + 20 = 50 > 40 tokens in the y_ref row)
    ((30, 5, 3, 20), 16, (5, 3, 20), True),
    # still too long after the prompt cut: every response to 40 - 16 = 24, y_ref included
    ((30, 35, 10, 50), 16, (24, 10, 24), True),
    # a prompt already under max_prompt_length stays whole; responses get the room left
    ((10, 50, 45, None), 10, (30, 30, None), True),
    # chosen or rejected longest, as in the paper's code
    ((30, 20, 3, 3), 16, (20, 3, 3), True),
])
def test_truncation_keeps_the_prompt_end_and_cuts_all_responses_alike(
        lengths, prompt_kept, kept, truncated):
    ex = example(*lengths)
    (out,) = tokenize([ex], CharTokenizer(), max_length=40, max_prompt_length=16)
    full_prompt = chars(f"<u>{ex.prompt[0]['content']}|<a>")
    assert len(full_prompt) == lengths[0]
    assert list(out.prompt_ids) == full_prompt[-prompt_kept:]  # keep_end: cut from the left
    for answer, ids, n in zip((ex.chosen, ex.rejected, ex.reference),
                              (out.chosen_ids, out.rejected_ids, out.ref_ids), kept, strict=True):
        if answer is None:
            assert ids is None and n is None
            continue
        assert list(ids) == chars(answer + "|")[:n]  # responses keep their start
        assert len(out.prompt_ids) + len(ids) <= 40
    assert out.truncated is truncated


def test_truncation_on_the_real_tokenizer(tokenizer):
    long = " ".join(f"word{i}" for i in range(200))
    ex = PreferenceExample("p", [{"role": "user", "content": long}], "short", "brief",
                           long + " and more")
    (full,) = tokenize([ex], tokenizer, max_length=4096, max_prompt_length=2048)
    (out,) = tokenize([ex], tokenizer, max_length=96, max_prompt_length=40)
    assert len(full.prompt_ids) > 40 and len(full.ref_ids) > 56 and out.truncated
    assert out.prompt_ids == full.prompt_ids[-40:]
    assert (out.chosen_ids, out.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    assert out.ref_ids == full.ref_ids[:96 - 40]


def test_bad_settings_are_refused(tokenizer):
    ex = PreferenceExample("p", [{"role": "user", "content": "x"}], "a", "b", None)
    for max_length, max_prompt in ((512, 512), (512, 0), (100, 600)):
        with pytest.raises(SelmError, match="max_prompt_length"):
            tokenize([ex], tokenizer, max_length=max_length, max_prompt_length=max_prompt)
    bare = CharTokenizer()
    bare.chat_template = None
    with pytest.raises(SelmError, match="has no chat template"):
        tokenize([ex], bare)


def test_tokenizing_is_deterministic(snapshots, tiny_lm):
    from transformers import AutoTokenizer

    store, _, _ = snapshots
    ref = f"{store.root}@uf"
    first = tokenize(read_examples(resolve_snapshot(ref)), AutoTokenizer.from_pretrained(tiny_lm))
    again = tokenize(read_examples(resolve_snapshot(ref)), AutoTokenizer.from_pretrained(tiny_lm))
    assert first == again
    a, b = (collate(x, 2, with_reference=True) for x in (first, again))
    assert all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("input_ids", "attention_mask", "loss_mask"))


# ---- batching ------------------------------------------------------------------------------

def tokenized(snapshots, tokenizer, name="uf") -> list[TokenizedExample]:
    store, _, _ = snapshots
    examples = read_examples(resolve_snapshot(f"{store.root}@{name}"))
    if name == "uf":  # one much longer pair, so that every other row is padded
        examples.append(PreferenceExample("long", [{"role": "user", "content": "Tell me more "
                                                    * 6}], "Sure: " * 9, "No.", "Fine " * 14))
    return tokenize(examples, tokenizer)


@pytest.mark.parametrize("with_reference", [True, False])
def test_collate_stacks_blocks_right_padded_with_response_masks(snapshots, tokenizer,
                                                                with_reference):
    batch = tokenized(snapshots, tokenizer)
    pad = tokenizer.pad_token_id
    out = collate(batch, pad, with_reference=with_reference)
    blocks = ["chosen_ids", "rejected_ids"] + (["ref_ids"] if with_reference else [])
    # rows in order of first appearance, one per distinct response of an example
    expected: list[tuple] = []
    for b in blocks:
        for i, ex in enumerate(batch):
            if (i, ex.prompt_ids, getattr(ex, b)) not in expected:
                expected.append((i, ex.prompt_ids, getattr(ex, b)))
    width = max(len(p) + len(r) for _, p, r in expected)
    assert out.input_ids.shape == out.attention_mask.shape == out.loss_mask.shape == (
        len(expected), width)
    assert out.pair_ids == tuple(ex.pair_id for ex in batch) and len(out.slots) == len(blocks)
    for i, (_, prompt, response) in enumerate(expected):
        n = len(prompt) + len(response)
        assert out.input_ids[i].tolist() == list(prompt + response) + [pad] * (width - n)
        assert out.attention_mask[i].tolist() == [1] * n + [0] * (width - n)
        assert out.loss_mask[i].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (
            width - n)
    lengths = out.loss_mask.sum(-1)
    for b, part in zip(blocks, out.split(lengths), strict=True):
        assert part.tolist() == [len(getattr(ex, b)) for ex in batch]
    rows = out.split(torch.arange(len(expected)))
    for b, part in zip(blocks, rows, strict=True):
        for i, (ex, row) in enumerate(zip(batch, part.tolist(), strict=True)):
            assert expected[row] == (i, ex.prompt_ids, getattr(ex, b))


def test_collate_runs_a_y_ref_equal_to_chosen_or_rejected_once():
    """y_ref that became the chosen (or rejected) answer shares that row; a y_ref equal to
    another example's answer does not (different prompt, different sequence)."""
    same_chosen = TokenizedExample("a", (1, 2), (3, 4), (5,), (3, 4), False)
    same_rejected = TokenizedExample("b", (1, 2), (6,), (7, 8), (7, 8), False)
    own = TokenizedExample("c", (9,), (3, 4), (5,), (7, 8), False)
    out = collate([same_chosen, same_rejected, own], 0, with_reference=True)
    assert out.input_ids.shape[0] == 7  # 3 chosen + 3 rejected + 1 y_ref
    assert out.slots == ((0, 1, 2), (3, 4, 5), (0, 4, 6))
    assert out.input_ids[6].tolist()[:3] == [9, 7, 8]


def test_collate_refuses_pairs_without_y_ref_when_it_is_needed(snapshots, tokenizer):
    batch = tokenized(snapshots, tokenizer, "noref")
    with pytest.raises(SelmError, match=r"3 pair\(s\) have no reference response y_ref .* "
                                        r"loss dpo or ipo"):
        collate(batch, 2, with_reference=True)
    assert collate(batch, 2, with_reference=False).input_ids.shape[0] == 6


def test_one_batched_forward_gives_each_sequence_its_own_log_prob(snapshots, tokenizer, model):
    """sequence_logps on the padded (chosen, rejected, y_ref) batch equals, for every row, the
    sum of the response tokens' log-probs computed on that sequence alone (float64)."""
    batch = tokenized(snapshots, tokenizer)
    out: Batch = collate(batch, tokenizer.pad_token_id, with_reference=True)
    assert (out.attention_mask == 0).any()  # padding is exercised
    with torch.no_grad():
        logits = model(input_ids=out.input_ids, attention_mask=out.attention_mask).logits
        batched = sequence_logps(logits, out.input_ids, out.loss_mask)
        for part, block in zip(out.split(batched), ("chosen_ids", "rejected_ids", "ref_ids"),
                               strict=True):
            for got, ex in zip(part.tolist(), batch, strict=True):
                ids = torch.tensor([ex.prompt_ids + getattr(ex, block)])
                alone = model(input_ids=ids).logits[0].double().log_softmax(-1)
                start = len(ex.prompt_ids)
                want = sum(alone[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
                assert got == pytest.approx(want, abs=1e-4)


def test_batch_moves_and_checks_its_rows(snapshots, tokenizer):
    out = collate(tokenized(snapshots, tokenizer), 2, with_reference=True)
    moved = out.to("cpu")
    assert moved.pair_ids == out.pair_ids and torch.equal(moved.input_ids, out.input_ids)
    with pytest.raises(ValueError, match="expected 18 rows"):
        out.split(torch.zeros(4))
    with pytest.raises(ValueError, match="at least one"):
        collate([], 2, with_reference=False)

