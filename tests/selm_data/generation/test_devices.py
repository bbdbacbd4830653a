"""Where models run: device and dtype resolution (CPU here; a GPU's branches through torch's own
counters made to say there are GPUs), and every model's inputs following it."""

from __future__ import annotations

import pytest
import torch

from selm_data.errors import SelmError
from selm_data.generation import devices
from selm_data.generation.devices import resolve_device, resolve_dtype
from selm_data.manifest import GenerationSpec, Manifest, RankerSpec


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it answers on a machine with two GPUs (bf16-capable): only counters change,
    no tensor is made on a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_is_the_cpu_in_fp32_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert resolve_dtype("auto", device) == torch.float32


def test_an_explicit_device_and_dtype_are_honoured():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda:1")) == torch.float16


def test_a_gpu_asked_for_on_a_machine_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for requested in ("cuda", "cuda:0"):
        with pytest.raises(SelmError, match=r"sees none .* set the device to auto or cpu"):
            resolve_device(requested)


def test_auto_takes_the_local_ranks_gpu_in_bf16(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0"), "an explicit index wins"
    assert resolve_device("cpu") == torch.device("cpu")


def test_gpu_indices_beyond_the_visible_ones_are_refused(two_gpus, monkeypatch):
    with pytest.raises(SelmError, match="device 'cuda:2' names GPU 2, but this process sees 2"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(SelmError, match="LOCAL_RANK names GPU 3"):
        resolve_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(SelmError, match="LOCAL_RANK is 'x'"):
        devices.local_rank()


def test_fp16_where_a_gpu_has_no_bf16(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float16


def test_manifest_devices_are_validated():
    assert RankerSpec(device="cuda:3", dtype="bfloat16").device == "cuda:3"
    assert GenerationSpec(backend="transformers", device="cpu").device == "cpu"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match="should match pattern"):
            RankerSpec(device=bad)
    with pytest.raises(ValueError, match=r"generation\.device applies to backend 'transformers'"):
        GenerationSpec(backend="vllm", device="cuda:1")
    with pytest.raises(ValueError, match=r"Extra inputs are not permitted"):
        RankerSpec(devise="cpu")
    with pytest.raises(ValueError, match="ranker kind 'judge' runs on its server"):
        RankerSpec(kind="judge", server={"base_url": "http://x"}, device="cpu")
    assert "device" in Manifest.model_fields["ranker"].annotation.model_fields


class _Reached(Exception):
    """Raised by a hook once it has seen where the inputs are: a model on the meta device
    computes nothing, so the test stops at the first forward."""


def _meta(monkeypatch, module) -> None:
    """Make `module` resolve every device to `meta`: a device that is not the CPU, so inputs
    left on the CPU are told apart from inputs that followed the model."""
    monkeypatch.setattr(module, "resolve_device", lambda requested="auto": torch.device("meta"))
    monkeypatch.setattr(module, "resolve_dtype", lambda requested, device: torch.float32)


@pytest.mark.slow
def test_reward_model_inputs_follow_the_model(tiny_rm, monkeypatch):
    from selm_data.rankers import reward_model
    from selm_data.rankers.base import RankRequest

    _meta(monkeypatch, reward_model)
    ranker = reward_model.RewardModelRanker(str(tiny_rm), revision=None, batch_size=4,
                                            fingerprint="f", device="cuda:1")
    assert next(ranker.model.parameters()).device.type == "meta"
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: v.device.type for k, v in kwargs.items() if torch.is_tensor(v)})
        raise _Reached

    ranker.model.register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(_Reached):
        ranker.score([RankRequest([{"role": "user", "content": "hi"}], ["a", "b c"])])
    assert seen == [{"input_ids": "meta", "attention_mask": "meta"}]


@pytest.mark.slow
def test_transformers_generator_inputs_follow_the_model(tiny_lm, monkeypatch):
    from selm_data.generation import backends
    from selm_data.manifest import PolicySpec

    _meta(monkeypatch, backends)
    gen = backends.TransformersGenerator(str(tiny_lm), policy=PolicySpec(model=str(tiny_lm)),
                                         revision=None, batch_size=2, device="cuda:1")
    assert next(gen.model.parameters()).device.type == "meta"
    seen = []

    def generate(**kwargs):
        seen.append({k: v.device.type for k, v in kwargs.items() if torch.is_tensor(v)})
        raise _Reached

    gen.model.generate = generate
    spec = GenerationSpec(backend="transformers", max_tokens=4)
    out = gen.generate(backends.requests_for(spec, [("p", [{"role": "user", "content": "hi"}])]))
    assert out[0].status == "failed" and "_Reached" in (out[0].error or "")
    assert seen == [{"input_ids": "meta", "attention_mask": "meta"}]


@pytest.mark.slow
def test_demo_embedder_inputs_follow_the_model(monkeypatch):
    from selm_data.rankers import demo

    try:
        folder = demo.embedder_folder()
    except SelmError as e:
        pytest.skip(f"demo embedder not installed: {e}")
    _meta(monkeypatch, demo)
    embedder = demo.Embedder(folder, device="cuda:1")
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: v.device.type for k, v in kwargs.items() if torch.is_tensor(v)})
        raise _Reached

    embedder.model.register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(_Reached):
        embedder.embed(["a prompt"], ["an answer"])
    assert seen and set(seen[0].values()) == {"meta"}
