"""The one place that talks HTTP to vLLM; every httpx error is translated here.

    TrainqError (producer.errors)
    └── VLLMError                   vLLM answered with an error we did not expect
        ├── VLLMUnavailableError    no answer: not started yet, dead, or timed out; retry later
        └── AdapterNotFoundError    vLLM found no adapter at the path (or no such adapter to unload)
"""

from __future__ import annotations

from typing import Any

import httpx

from producer.errors import TrainqError

__all__ = ["AdapterNotFoundError", "VLLMClient", "VLLMError", "VLLMUnavailableError"]


class VLLMError(TrainqError):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class VLLMUnavailableError(VLLMError, ConnectionError):
    """vLLM did not answer; the supervisor restarts it and the adapters are reloaded then."""


class AdapterNotFoundError(VLLMError, LookupError):
    """404 from vLLM's adapter endpoints."""


class VLLMClient:
    """Async client of one vLLM OpenAI server: health, adapter loading, a 1-token probe.

    ``api_key`` is sent as a bearer token on every request (vLLM checks it on
    ``/v1/*``; ``/health`` and ``/metrics`` stay open).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        """True when vLLM answers ``/health`` with 200 within ``timeout_s``."""
        try:
            response = await self._request("GET", "/health", timeout_s=timeout_s)
        except VLLMError:
            return False
        return response.status_code == 200

    async def load_adapter(self, name: str, path: str, *, replace: bool = False) -> bool:
        """Load the peft adapter at ``path`` as model ``name``; False if it was loaded already.

        ``replace`` reloads a name that is already loaded (new weights under the same name).
        """
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if replace:
            body["load_inplace"] = True
        response = await self._request("POST", "/v1/load_lora_adapter", json=body)
        if response.status_code == 400 and "already been loaded" in response.text:
            return False
        self._raise_for_status(response, f"loading adapter {name!r} from {path}")
        return True

    async def unload_adapter(self, name: str) -> bool:
        """Unload adapter ``name``; False if vLLM did not have it."""
        response = await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 404:
            return False
        self._raise_for_status(response, f"unloading adapter {name!r}")
        return True

    async def complete_one_token(self, model: str, prompt: str = "0") -> None:
        """Ask ``model`` for one token: proof that it is servable (and its warm-up)."""
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        response = await self._request("POST", "/v1/completions", json=body)
        self._raise_for_status(response, f"1-token completion on {model!r}")

    async def chat_one_token(self, model: str) -> None:
        """One token through the chat path with logprobs: what rollout clients call."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "0"}],
            "max_tokens": 1,
            "logprobs": True,
        }
        response = await self._request("POST", "/v1/chat/completions", json=body)
        self._raise_for_status(response, f"1-token chat completion on {model!r}")

    async def _request(self, method: str, path: str, *, timeout_s: float | None = None, **kwargs: Any) -> httpx.Response:
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else httpx.Timeout(timeout_s)
        try:
            return await self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as exc:  # connect refused, reset, timeouts: vLLM is not there
            raise VLLMUnavailableError(f"vLLM at {self._http.base_url} did not answer {method} {path}: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise VLLMError(f"{method} {path} to vLLM failed: {exc!r}") from exc

    @staticmethod
    def _raise_for_status(response: httpx.Response, doing: str) -> None:
        if response.is_success:
            return
        detail = response.text[:500]
        if response.status_code == 404:
            raise AdapterNotFoundError(f"{doing}: 404 {detail}", 404)
        raise VLLMError(f"{doing}: {response.status_code} {detail}", response.status_code)
