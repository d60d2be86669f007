"""An ASGI middleware in vLLM's API server: every completion carries what the trainer needs.

vLLM returns a sampled turn's logprobs and token ids only when the request asks
(``logprobs``, ``return_token_ids``), and a choice does not say which model,
temperature and prompt it came from. Rollout code written for OpenPipe ART
asks for none of it and puts ``completion.choices[0]`` into its trajectory. So,
for ``/v1/chat/completions`` and ``/v1/completions``:

- a request that does not set them gets ``logprobs`` (the sampled tokens' own),
  ``return_token_ids`` (the sampled and the prompt's token ids) and an explicit
  ``temperature`` of 1.0 (vLLM's default with ``--generation-config vllm``), so
  the temperature is known; a request that sets any of them keeps its value;
- every choice of a JSON (not streamed) answer gets ``trainq_sampler``: the
  request's ``model`` (``name@step``), its ``temperature`` and the prompt's
  token ids, so that a bare choice carries all ``Choice.from_openai`` needs.

With ``--logprobs-mode processed_logprobs`` (``supervisor.vllm_command``) the
logprobs are those of the distribution sampled from, temperature included.
vLLM loads this class by its import path (``--middleware``): it imports only
the standard library and trainq's wire contract, and works the same on vLLM's
CPU and GPU builds.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from producer.types import SAMPLER_FIELD

__all__ = ["DEFAULT_TEMPERATURE", "MIDDLEWARE", "SamplerDefaults", "annotate", "with_defaults"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIDDLEWARE = f"{__name__}.SamplerDefaults"
"""What ``--middleware`` names."""
DEFAULT_TEMPERATURE = 1.0
_CHAT = "/v1/chat/completions"
_TEXT = "/v1/completions"


def with_defaults(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with the fields it leaves unset (absent or null) set to what the trainer needs."""
    defaults = {
        "logprobs": True if path == _CHAT else 0,  # a text completion's logprobs count the alternatives
        "return_token_ids": True,
        "temperature": DEFAULT_TEMPERATURE,
    }
    for key, value in defaults.items():
        if request.get(key) is None:
            request[key] = value
    return request


def annotate(path: str, request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """``response`` with ``trainq_sampler`` (model, temperature, prompt token ids) in each of its choices."""
    for choice in response.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        sampler: dict[str, Any] = {"model": request.get("model"), "temperature": request.get("temperature")}
        prompt = response.get("prompt_token_ids") if path == _CHAT else choice.get("prompt_token_ids")
        if prompt is not None:
            sampler["prompt_token_ids"] = prompt
        choice[SAMPLER_FIELD] = sampler
    return response


class SamplerDefaults:
    """The middleware: ``with_defaults`` on the way in, ``annotate`` on the way out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in (_CHAT, _TEXT):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        request = _json_object(body)
        if request is None:  # not ours to judge: vLLM answers a malformed body itself
            await self.app(scope, _replay(body, receive), send)
            return
        body = json.dumps(with_defaults(path, request)).encode()
        scope = {**scope, "headers": _with_length(scope.get("headers", []), len(body))}
        if request.get("stream"):
            await self.app(scope, _replay(body, receive), send)
            return
        await self.app(scope, _replay(body, receive), _Annotating(path, request, send))


class _Annotating:
    """A ``send`` that holds back a JSON answer until its last chunk, then sends it annotated."""

    def __init__(self, path: str, request: dict[str, Any], send: Send) -> None:
        self.path, self.request, self.send = path, request, send
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if message.get("status") == 200 and _is_json(message.get("headers", [])):
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            await self._send_annotated()
            return
        await self.send(message)

    async def _send_annotated(self) -> None:
        assert self.start is not None
        body = b"".join(self.chunks)
        response = _json_object(body)
        if response is not None:
            body = json.dumps(annotate(self.path, self.request, response)).encode()
        start = {**self.start, "headers": _with_length(self.start.get("headers", []), len(body))}
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away; the app will hear it too
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever comes (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"application/json") for name, value in headers)


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]
