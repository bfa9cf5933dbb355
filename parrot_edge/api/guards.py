"""What a request must pass before any route sees it: its Host, its size, its API key, its client's share.
Plain ASGI, so streamed answers pass through untouched (Starlette's `@app.middleware` would copy every chunk
through an extra task), and a refusal costs nothing of what the refused client sent: not even parsing it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from parrot_edge.api.errors import ApiError, busy, error_response
from parrot_edge.api.fairness import ClientLimit, client_address

GENERATING = ("/v1/chat/completions", "/v1/completions")  # the routes that hold a place in the engine

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "*")


def allowed_host_names(configured: list[str], bound_host: str) -> set[str] | None:
    """The Host header names to accept; None: any. A web page in a student's browser could otherwise reach the
    keyless loopback API under a name of its own that resolves to 127.0.0.1 (DNS rebinding)."""
    if configured:
        return None if "*" in configured else {name.lower() for name in configured}
    if bound_host in WILDCARD_HOSTS:
        return None  # bound to every address: only with an API key, which a rebinding page does not have
    return {*LOOPBACK_NAMES, bound_host.lower()}


def _host_name(host_header: bytes) -> str:
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """Host check, body size limit, API key and the client's share, in that order (the key after Host and
    size: a refused Host or size tells nothing about keys)."""

    def __init__(self, app, *, allowed_hosts: set[str] | None, max_body: int, api_key: str | None,
                 clients: ClientLimit, retry_after: Callable[[], int], record: Callable[[str, str], None]):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body
        self.api_key = api_key.encode() if api_key else None
        self.clients = clients
        self.retry_after = retry_after
        self.record = record  # (endpoint, outcome) into /metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        client = client_address(scope)
        refusal = self._refusal(scope, headers)
        if refusal is None and b"content-length" not in headers and scope["method"] in ("POST", "PUT", "PATCH"):
            receive, refusal = await self._bounded_body(receive)
        if refusal is not None:
            self.clients.misbehaved(client)
            await error_response(refusal)(scope, receive, send)
            return
        if scope["path"] not in GENERATING:
            await self.app(scope, receive, send)
            return
        if not self.clients.take(client):
            refusal = busy(f"this client already has {self.clients.per_client} requests under way; wait for one "
                           "to finish", self.retry_after(), "too_many_requests", status=429)
            self.record("chat" if scope["path"] == GENERATING[0] else "completions", "too_many")
            await error_response(refusal)(scope, receive, send)
            return
        try:  # held until the answer is sent (a stream to its end), or the client has gone
            await self.app(scope, receive, send)
        finally:
            self.clients.give_back(client)

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> ApiError | None:
        if self.allowed_hosts is not None and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            return ApiError(400, "this server does not answer to that Host name; use http://127.0.0.1 or a name "
                                 "in its allowed_hosts setting", code="invalid_host")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return ApiError(413, f"the request body is larger than this server accepts ({self.max_body:,} bytes)",
                            code="request_too_large")
        if self.api_key and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                type="authentication_error", code="invalid_api_key")
        return None

    async def _bounded_body(self, receive):
        """A chunked body, read here up to the limit and handed on; (receive for the app, or a refusal)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body:
                return receive, ApiError(413, f"the request body is larger than this server accepts "
                                              f"({self.max_body:,} bytes)", code="request_too_large")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        return replay, None
