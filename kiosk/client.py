"""The small HTTP client the chat needs: /health and streamed chat completions, with the server's answers
turned into a few exception types the interface can explain to a child."""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx

# A streamed answer may sit silent while the request queues for a slot; the server gives up after its
# request_timeout (300 s by default), so waiting as long is never waiting for nothing.
TIMEOUT = httpx.Timeout(300.0, connect=3.0)
HEALTH_TIMEOUT = httpx.Timeout(3.0)


class Connection(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    LOADING = "loading"
    DOWN = "down"
    BROKEN = "broken"


@dataclass(frozen=True)
class Health:
    connection: Connection
    model: str | None = None


@dataclass(frozen=True)
class AnswerEnd:
    """The end of an answer, with its decode speed as the server measured it."""

    tokens_per_second: float | None


class ServerUnavailable(Exception):
    """Down, restarting, still loading, or now serving another model: worth waiting for."""


class ServerBusy(Exception):
    """Every slot and the queue are full."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy, retry after {retry_after} s")
        self.retry_after = retry_after


class ConversationTooLong(Exception):
    """The conversation no longer fits in the model's context."""


class NotAllowed(Exception):
    """The server wants an API key this kiosk does not have."""


class ServerRefused(Exception):
    """Any other error; the message is for the log, not for the student."""


def backoff(first: float = 0.5, limit: float = 8.0) -> Iterator[float]:
    """Seconds to wait between reconnection attempts: doubling from `first`, then `limit` forever."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, limit)


class ParrotClient:
    def __init__(self, url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> Health:
        try:
            response = await self._http.get("/health", timeout=HEALTH_TIMEOUT)
            body = response.json()
        except (httpx.TransportError, ValueError):
            return Health(Connection.DOWN)
        if response.status_code == 200:
            return Health(Connection.READY, body.get("model"))
        return Health(Connection.LOADING if body.get("status") == "loading" else Connection.BROKEN)

    async def stream_chat(self, model: str, messages: list[dict[str, str]]) -> AsyncIterator[str | AnswerEnd]:
        """The answer's text as it is generated, then one `AnswerEnd`."""
        body = {"model": model, "messages": messages, "stream": True}
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error_for(response)
                async for piece in _read_events(response):
                    yield piece
        except httpx.TransportError as exc:  # refused, reset, or cut mid-answer by a restart
            raise ServerUnavailable(str(exc)) from exc


async def _read_events(response: httpx.Response) -> AsyncIterator[str | AnswerEnd]:
    speed = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise ServerRefused(f"generation failed: {chunk['error'].get('message')}")
        for choice in chunk.get("choices", []):
            if text := choice.get("delta", {}).get("content"):
                yield text
            if choice.get("finish_reason"):  # the last chunk carries the server's own measure
                speed = chunk.get("timings", {}).get("predicted_per_second")
    yield AnswerEnd(speed)


def _error_for(response: httpx.Response) -> Exception:
    try:
        error = response.json()["error"]
        code, message = error.get("code"), error.get("message")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = None, response.text[:200]
    status = response.status_code
    if code in ("loading", "model_not_found"):
        return ServerUnavailable(message)
    if status == 503 and code in ("queue_full", "timeout"):
        retry_after = response.headers.get("Retry-After", "")
        return ServerBusy(int(retry_after) if retry_after.isdigit() else 2)
    if code == "context_length_exceeded":
        return ConversationTooLong(message)
    if status == 401:
        return NotAllowed(message)
    return ServerRefused(f"HTTP {status} {code}: {message}")
