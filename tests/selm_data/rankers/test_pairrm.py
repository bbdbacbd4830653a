"""The PairRM ranker on a tiny PairRM-shaped ranker built on the spot, loaded through
llm-blender's own `Blender().loadranker(folder)`, against `Blender.rank` computed here."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from selm_data.builder.pairing import ranks
from selm_data.errors import SelmError
from selm_data.manifest import BUNDLED_DATA
from selm_data.rankers.base import RankRequest
from selm_data.rankers.pairrm import (
    PICKLE_PATTERNS,
    import_llm_blender,
    load_pairrm,
    render_prompt,
)

DATA = BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl"
# Token limits far below PairRM's 1224 / 412, so that prompts and responses are cut (the batch-
# dependent truncation is exercised) and every forward is short.
SOURCE_MAX, CANDIDATE_MAX = 128, 48
# Float tolerance: regrouped forwards pad differently, which changes float32 rounding (in float64
# the scores are bitwise equal: test_in_float64_the_scores_are_bitwise_blenders). Measured: up to
# 2e-5 on scores of order 1; the closest distinct scores of a request are 0.07 apart.
CLOSE = {"rel": 1e-4, "abs": 1e-4}


def build_backbone(folder: Path) -> Path:
    """A tiny random DeBERTa-v3-style backbone: a sentencepiece unigram model trained on
    UltraFeedback answers with DeBERTa-v3's special pieces ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3),
    loaded by AutoTokenizer from spm.model as microsoft/deberta-v3-large's is, and a 2-layer
    config with v3's relative attention settings."""
    import sentencepiece as spm
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    folder.mkdir(parents=True)
    corpus = [json.loads(line)["chosen"] for line in DATA.read_text().splitlines()[:100]]
    spm_model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=spm_model, vocab_size=400,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"], minloglevel=2)
    (folder / "spm.model").write_bytes(spm_model.getvalue())
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": false, "vocab_type": "spm"}')
    # keys that DebertaV2Config takes through **kwargs, not as declared parameters
    v3_keys: dict[str, Any] = {"position_buckets": 256, "norm_rel_ebd": "layer_norm",
                               "share_att_key": True}
    config = DebertaV2Config(
        vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, relative_attention=True, position_biased_input=False,
        pos_att_type=["p2c", "c2p"], max_relative_positions=-1, type_vocab_size=0,
        pad_token_id=0, initializer_range=0.5,  # larger weights: hidden states that differ
        **v3_keys)  # between inputs  # larger weights: hidden states that differ between inputs
    torch.manual_seed(0)
    DebertaV2Model(config).save_pretrained(folder)
    return folder


def build_ranker(folder: Path, backbone: Path) -> Path:
    """A PairRM-shaped ranker folder: llm-blender's RankerConfig as config.json (PairRM's fields,
    smaller token limits, `model_name` the local backbone) and a random pair ranker built by
    llm-blender's own `load_ranker`, saved as model.safetensors."""
    import safetensors.torch
    import torch

    llm_blender = import_llm_blender()
    from llm_blender.blender.blender_utils import load_ranker

    folder.mkdir(parents=True)
    config = llm_blender.RankerConfig(
        ranker_type="pairranker", model_type="deberta", model_name=str(backbone),
        source_maxlength=SOURCE_MAX, candidate_maxlength=CANDIDATE_MAX, num_pos=5, num_neg=5,
        sub_sampling_ratio=0.4, fp16=True)
    torch.manual_seed(1)
    ranker, _, _ = load_ranker(config)
    with torch.no_grad():  # a 10x head: scores of order 1, far above float rounding
        for p in ranker.head_layer.parameters():
            p.mul_(10.0)
    safetensors.torch.save_model(ranker, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config.to_json(indent=2))
    return folder


@pytest.fixture(scope="session")
def pairrm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairrm")
    return build_ranker(root / "ranker", build_backbone(root / "backbone"))


def ultrafeedback_requests(n: int) -> list[RankRequest]:
    """(y_ref, y_w, y_l) for the n bundled rows with the shortest prompts among the first 40
    (under SOURCE_MAX tokens: the room they leave differs from batch to batch, and with it the
    cut of each response). y_ref is another row's chosen answer (off topic), except in request
    3, where it repeats y_w: a tie the ranking must keep exact."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:40]]
    rows = sorted(sorted(rows, key=lambda r: len(r["prompt"]))[:n], key=rows.index)
    return [RankRequest([{"role": "user", "content": r["prompt"]}],
                        [r["chosen"] if k == 3 else rows[k - 1]["chosen"], r["chosen"],
                         r["rejected"]])
            for k, r in enumerate(rows)]


def blender_scores(folder: Path, requests: list[RankRequest], batch_size: int, *,
                   float64: bool = False) -> list:
    """The paper's call, on a Blender of its own."""
    llm_blender = import_llm_blender()
    blender = llm_blender.Blender()
    blender.loadranker(str(folder), device="cpu")
    if float64:
        blender.ranker.double()
    prompts = [r.messages[0]["content"] for r in requests]
    return blender.rank(prompts, [r.candidates for r in requests], return_scores=True,
                        batch_size=batch_size, disable_tqdm=True).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [8, 3])
def test_scores_are_blender_rank_scores(pairrm_folder, batch_size):
    requests = ultrafeedback_requests(12)
    ranker = load_pairrm(str(pairrm_folder), None, batch_size, device="cpu")
    ours = ranker.score(requests)
    theirs = blender_scores(pairrm_folder, requests, batch_size)
    assert len(ours) == 12 and all(len(s) == 3 for s in ours)
    for mine, paper in zip(ours, theirs, strict=True):
        assert mine == pytest.approx(paper, **CLOSE)
    assert [ranks(s) for s in ours] == [ranks(s) for s in theirs]
    assert ours[3][0] == ours[3][1], "a repeated candidate ties exactly"
    assert max(abs(x) for s in ours for x in s) > 0.5, "scores are not all near zero"


@pytest.mark.slow
def test_in_float64_the_scores_are_bitwise_blenders(pairrm_folder):
    """The same computation: without float32 rounding, regrouping changes nothing."""
    requests = ultrafeedback_requests(12)
    ranker = load_pairrm(str(pairrm_folder), None, 3, device="cpu")
    ranker.blender.ranker.double()
    assert ranker.score(requests) == blender_scores(pairrm_folder, requests, 3, float64=True)


@pytest.mark.slow
def test_these_requests_exercise_llm_blenders_batch_wide_truncation(pairrm_folder):
    """llm-blender cuts responses by the longest prompt of their batch: here some responses are
    cut differently at batch sizes 8 and 3, so the test above checks that grouping too."""
    requests = ultrafeedback_requests(12)
    by_8 = load_pairrm(str(pairrm_folder), None, 8, device="cpu").score(requests)
    by_3 = load_pairrm(str(pairrm_folder), None, 3, device="cpu").score(requests)
    assert any(a != pytest.approx(b, abs=0.01) for a, b in zip(by_8, by_3, strict=True))


@pytest.mark.slow
def test_batch_size_and_order_do_not_change_scores(pairrm_folder):
    """With nothing truncated, grouping changes only padding: the same scores either way."""
    requests = [
        RankRequest([{"role": "user", "content": "How do I cook a steak?"}],
                    ["Sear it, then roast it.", "Boil it for an hour.", "no"]),
        RankRequest([{"role": "user", "content": "hi"}], ["Hello! How can I help?", "hi", "Bye"]),
        RankRequest([{"role": "user", "content": "Name a prime number."}], ["7", "8", "seven"]),
    ]
    together = load_pairrm(str(pairrm_folder), None, 8, device="cpu").score(requests)
    one_by_one = load_pairrm(str(pairrm_folder), None, 1, device="cpu")
    alone = [one_by_one.score([r])[0] for r in requests]
    backwards = one_by_one.score(requests[::-1])[::-1]
    for a, b, c in zip(together, alone, backwards, strict=True):
        assert a == pytest.approx(b, **CLOSE) and a == pytest.approx(c, **CLOSE)
    assert [ranks(s) for s in together] == [ranks(s) for s in alone]


def test_prompt_is_the_user_turn_or_a_transcript():
    assert render_prompt([{"role": "user", "content": "how to cook t-bone"}]) == (
        "how to cook t-bone")
    assert render_prompt([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "bye"},
    ]) == "System: Be brief.\nUSER: hi\nAssistant: Hello.\nUSER: bye"


@pytest.mark.slow
def test_name_and_version_follow_the_folders(pairrm_folder, tmp_path):
    ranker = load_pairrm(str(pairrm_folder), None, 8, device="cpu")
    assert ranker.name == f"pairrm:{pairrm_folder}"
    assert re.fullmatch(r"[0-9a-f]{32}", ranker.version)
    assert load_pairrm(str(pairrm_folder), None, 2, device="cpu").version == ranker.version
    # the same ranker over a backbone whose tokenizer settings differ: another version
    backbone = shutil.copytree(pairrm_folder.parent / "backbone", tmp_path / "backbone")
    (backbone / "tokenizer_config.json").write_text(
        '{"do_lower_case": false, "vocab_type": "spm", "model_max_length": 512}')
    other = shutil.copytree(pairrm_folder, tmp_path / "ranker")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_name": str(backbone)}))
    assert load_pairrm(str(other), None, 8, device="cpu").version != ranker.version


@pytest.mark.slow
def test_a_hub_id_is_downloaded_at_its_revision_without_pickles(pairrm_folder, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(pairrm_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ranker = load_pairrm("llm-blender/PairRM", "abc123", 8, device="cpu")
    assert calls == [("llm-blender/PairRM",
                      {"revision": "abc123", "ignore_patterns": PICKLE_PATTERNS})]
    assert "*.bin" in PICKLE_PATTERNS
    assert ranker.name == "pairrm:llm-blender/PairRM"


def _copy_with(src: Path, dst: Path, **config: object) -> Path:
    shutil.copytree(src, dst)
    current = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**current, **config}))
    return dst


@pytest.mark.slow
def test_bad_folders_are_refused_with_the_fix(pairrm_folder, tmp_path):
    import safetensors.torch
    import torch

    def refused(model: str, match: str, revision: str | None = None) -> None:
        with pytest.raises(SelmError, match=match):
            load_pairrm(model, revision, 8, device="cpu")

    refused(str(tmp_path / "missing"), "neither an existing folder nor a Hub id")
    refused(str(pairrm_folder), "revision applies to Hub ids only", revision="main")
    (tmp_path / "empty").mkdir()
    refused(str(tmp_path / "empty"), "has no config.json")
    refused(str(_copy_with(pairrm_folder, tmp_path / "rm", ranker_type="deberta-rm")),
            "kind: reward_model")
    pickled = _copy_with(pairrm_folder, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    refused(str(pickled), "never loads pickled weights")
    (pickled / "model.safetensors").write_bytes(b"")
    refused(str(pickled), "would unpickle it first")
    phi_dir = shutil.copytree(pairrm_folder.parent / "backbone", tmp_path / "phi-backbone")
    refused(str(_copy_with(pairrm_folder, tmp_path / "phi", model_name=str(phi_dir))),
            "trust_remote_code")
    broken = _copy_with(pairrm_folder, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    refused(str(broken), "not a safetensors file")
    safetensors.torch.save_file({"head": torch.zeros(1)}, str(broken / "model.safetensors"))
    refused(str(broken), "llm-blender could not load the ranker")  # strict: keys must match


def test_a_missing_llm_blender_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llm_blender", None)  # import fails as if not installed
    with pytest.raises(SelmError, match=re.escape("pip install 'selm[pairrm]'")):
        import_llm_blender()


def test_the_bridge_leaves_transformers_as_it_was():
    from transformers.utils import hub

    had_cache = hasattr(hub, "TRANSFORMERS_CACHE")
    import_llm_blender()
    assert hasattr(hub, "TRANSFORMERS_CACHE") == had_cache
