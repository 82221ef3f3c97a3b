"""An OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp's server, ``transformers serve``, a hosted API), reached
through the ``openai`` client: what the LLM judge (``evals.judge``) and generation on a server
(``evals.served``) both send their requests through.

``OpenAIEndpoint.run`` sends requests with at most ``concurrency`` in flight; connection errors, timeouts, 408,
409, 429 and 5xx are retried ``max_retries`` times with jittered exponential backoff (a 429's Retry-After is
honoured; the client's own retries are off, so that the count and the message are ours). A refused key, an unknown
model or a rejected request stops at once with an ``EndpointError`` that says what to fix.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import openai

T = TypeVar("T")

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
#: sent when the key variable is unset: local servers need a key-shaped string, not a key
PLACEHOLDER_KEY = "EMPTY"


class EndpointError(RuntimeError):
    """The endpoint cannot answer: unreachable, key refused, model unknown, request rejected."""


def _integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


@dataclass(frozen=True)
class EndpointSettings:
    """Where and how to reach an endpoint. ``base_url`` None takes ``$OPENAI_BASE_URL``, else OpenAI's own API; the
    key is read from the environment variable named ``api_key_env`` (keys never live in config files, which are
    saved with a run). ``check()`` returns the first bad setting as ``(key, value, what is valid)``."""

    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 60.0

    def resolved_url(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"

    def check(self) -> tuple[str, Any, str] | None:
        url, key_env = self.base_url, self.api_key_env
        for key, value, ok, valid in [
            ("base_url", url, url is None or (isinstance(url, str) and url.startswith(("http://", "https://"))),
             "the http(s) URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1, or null for "
             "$OPENAI_BASE_URL"),
            ("api_key_env", key_env, isinstance(key_env, str) and re.fullmatch(r"[A-Za-z_]\w*", key_env) is not None,
             "the NAME of the environment variable holding the key (e.g. OPENAI_API_KEY), not the key"),
            ("concurrency", self.concurrency, _integer(self.concurrency, 1), "an integer >= 1"),
            ("max_retries", self.max_retries, _integer(self.max_retries, 0), "an integer >= 0"),
            ("timeout_s", self.timeout_s, _seconds(self.timeout_s), "a number of seconds > 0"),
        ]:
            if not ok:
                return key, value, valid
        return None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> EndpointSettings:
        """The endpoint settings among ``cfg``'s keys (the others are left to the caller)."""
        return cls(**{k: cfg[k] for k in cls.keys() if k in cfg})


def _said(error: openai.APIStatusError) -> str:
    """An API error's status and the body the server sent (its own explanation), shortened."""
    body = error.body if error.body is not None else error.message
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"{error.status_code} {text[:500]}"


class OpenAIEndpoint:
    """One model behind an OpenAI-compatible API. ``what`` names it in messages ("the judge endpoint")."""

    def __init__(self, settings: EndpointSettings, model: str, what: str = "the endpoint") -> None:
        import openai

        self.settings, self.model, self.what = settings, model, what
        self.url = settings.resolved_url()
        self.key_set = bool(os.environ.get(settings.api_key_env))
        self.client = openai.OpenAI(base_url=self.url, api_key=os.environ.get(settings.api_key_env) or PLACEHOLDER_KEY,
                                    timeout=settings.timeout_s, max_retries=0)

    def run(self, requests: Sequence[Callable[[openai.OpenAI], T]]) -> list[T]:
        """Each ``request(client)``'s result, in order, at most ``concurrency`` at a time, each retried as above."""
        if not requests:
            return []
        stop = threading.Event()  # set at the first fatal error: the other requests give up instead of retrying
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(requests))) as pool:
            futures = [pool.submit(self._one, request, stop) for request in requests]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
        return [f.result() for f in futures]

    def chat(self, chats: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """The greedy reply to each chat."""
        def request(messages: list[dict[str, str]]) -> Callable[[openai.OpenAI], str]:
            def send(client: openai.OpenAI) -> str:
                response = client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                          max_tokens=max_tokens)
                return response.choices[0].message.content or ""
            return send
        return self.run([request(m) for m in chats])

    def _one(self, request: Callable[[openai.OpenAI], T], stop: threading.Event) -> T:
        import openai

        tries = self.settings.max_retries + 1
        for attempt in range(tries):
            if stop.is_set():
                raise EndpointError(f"abandoned: another request to {self.what} failed")
            try:
                return request(self.client)
            except openai.APIConnectionError as e:  # includes timeouts
                error: openai.APIError = e
            except (openai.RateLimitError, openai.InternalServerError) as e:
                error = e
            except openai.APIStatusError as e:
                if e.status_code not in (408, 409):
                    raise self._fatal(e) from e
                error = e
            if attempt + 1 < tries:
                stop.wait(self._delay(attempt, error))
        if isinstance(error, openai.APIConnectionError):
            raise EndpointError(
                f"{self.what} {self.url} could not be reached ({type(error).__name__}: {error}) in {tries} tries "
                f"(timeout_s={self.settings.timeout_s:g}); the server must be running there (e.g. `vllm serve MODEL`, "
                f"`transformers serve MODEL`) and base_url must point at its /v1 API") from error
        raise EndpointError(f"{self.what} {self.url} kept failing in {tries} tries: {_said(error)}") from error

    @staticmethod
    def _delay(attempt: int, error: Exception) -> float:
        import openai

        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt) * random.uniform(0.5, 1.0)
        if isinstance(error, openai.RateLimitError):
            asked = error.response.headers.get("retry-after", "")
            if re.fullmatch(r"\d+(\.\d+)?", asked.strip()):
                delay = max(delay, min(BACKOFF_CAP_S, float(asked)))
        return delay

    def _fatal(self, error: openai.APIStatusError) -> EndpointError:
        import openai

        env = self.settings.api_key_env
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            source = (f"the key came from the environment variable {env}" if self.key_set else
                      f"the environment variable {env} is not set, so the placeholder key {PLACEHOLDER_KEY!r} was sent")
            return EndpointError(f"{self.what} {self.url} refused the API key: {source}; set {env} (or name another "
                                 f"variable with api_key_env). Server said: {_said(error)}")
        if isinstance(error, openai.NotFoundError):
            try:
                served = ", ".join(m.id for m in self.client.models.list()) or "none listed"
            except openai.OpenAIError:
                served = "unknown (listing the models failed too)"
            return EndpointError(f"{self.what} {self.url} has no model {self.model!r} (or base_url misses the API's "
                                 f"/v1 path); it serves: {served}. Server said: {_said(error)}")
        return EndpointError(f"{self.what} {self.url} rejected the request for model {self.model!r}: {_said(error)}")


__all__ = ["EndpointError", "EndpointSettings", "OpenAIEndpoint", "PLACEHOLDER_KEY"]
