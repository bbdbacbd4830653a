"""OpenAI-compatible servers (`vllm serve`, any chat-completions endpoint), for generation and
for the judge.

The API key is read from the variable the manifest names, at call time; it is never stored, and
errors that reach the store or the terminal have it masked.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

from selm_data.errors import SelmError
from selm_data.manifest import ServerSpec

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam


class Server:
    """A chat-completions client bound to one served model."""

    def __init__(self, spec: ServerSpec, *, timeout_s: float = 600.0, max_retries: int = 2):
        try:
            from openai import OpenAI
        except ImportError:
            raise SelmError(
                "an OpenAI-compatible server needs the `openai` client: "
                "`pip install 'selm[openai]'`"
            ) from None
        self._key = os.environ.get(spec.api_key_env) or ""
        # vLLM serves without a key unless started with --api-key; the client wants a string.
        self.client = OpenAI(base_url=spec.base_url, api_key=self._key or "EMPTY",
                             timeout=timeout_s, max_retries=max_retries)
        self.base_url = spec.base_url
        self.max_concurrency = spec.max_concurrency
        self.model = self._served_model(spec.model)

    def _served_model(self, wanted: str | None) -> str:
        try:
            served = [m.id for m in self.client.models.list()]
        except Exception as e:
            raise SelmError(
                f"cannot list the models of {self.base_url}: {self.redact(str(e))}. Start the "
                "server (e.g. `vllm serve MODEL`) or fix `server.base_url`"
            ) from None
        if wanted is None and len(served) == 1:
            return served[0]
        if wanted is None or wanted not in served:
            raise SelmError(
                f"{self.base_url} serves {served}; set `server.model` to one of them"
                + ("" if wanted is None else f" (not {wanted!r})")
            )
        return wanted

    def chat(self, messages: list[dict[str, str]], **params: Any) -> Any:
        # plain {role, content} dicts; the server checks the roles
        turns = cast("list[ChatCompletionMessageParam]", messages)
        return self.client.chat.completions.create(model=self.model, messages=turns, **params)

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text
