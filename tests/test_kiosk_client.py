"""The chat's HTTP client: how the server's answers become the few things the chat explains to a student.

Real httpx responses throughout: built directly for the error mapping, streamed through httpx's own
MockTransport for the event reader, and over loopback from a small real HTTP server for the whole request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from serving import free_port

from parrot_edge.kiosk.client import (
    AnswerEnd,
    ConversationTooLong,
    NotAllowed,
    ParrotClient,
    ServerBusy,
    ServerRefused,
    ServerUnavailable,
    _error_for,
    _read_events,
)


def error_body(code: str | None, message: str = "what the server said") -> dict:
    return {"error": {"message": message, "type": "server_error", "code": code, "param": None}}


# -- the error mapping: every status and code the server sends, and some it should not

@pytest.mark.parametrize(("status", "code", "kind"), [
    (503, "loading", ServerUnavailable),             # the model is still loading
    (404, "model_not_found", ServerUnavailable),     # the server now serves another model
    (503, "queue_full", ServerBusy),
    (503, "timeout", ServerBusy),                    # queued past request_timeout
    (400, "context_length_exceeded", ConversationTooLong),
    (401, "invalid_api_key", NotAllowed),
    (401, None, NotAllowed),
    (400, "invalid_request_error", ServerRefused),
    (429, "queue_full", ServerRefused),              # "busy" only as the server says it: 503
    (503, "something_new", ServerRefused),
    (500, None, ServerRefused),
])
def test_each_error_becomes_the_exception_the_chat_explains(status, code, kind):
    problem = _error_for(httpx.Response(status, json=error_body(code)))
    assert type(problem) is kind
    if kind is ServerRefused:  # for the log: enough to tell what happened
        assert str(problem) == f"HTTP {status} {code}: what the server said"
    elif kind is not ServerBusy:
        assert str(problem) == "what the server said"


@pytest.mark.parametrize(("header", "seconds"), [
    ({"Retry-After": "7"}, 7),
    ({"Retry-After": "0"}, 0),
    ({}, 2),
    ({"Retry-After": ""}, 2),
    ({"Retry-After": "soon"}, 2),
    ({"Retry-After": "-3"}, 2),
    ({"Retry-After": "1.5"}, 2),
    ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 2),  # the HTTP-date form: not worth a clock
])
def test_a_full_queue_says_how_long_to_wait(header, seconds):
    busy = _error_for(httpx.Response(503, json=error_body("queue_full"), headers=header))
    assert isinstance(busy, ServerBusy) and busy.retry_after == seconds


@pytest.mark.parametrize("response", [
    httpx.Response(502, text="<html><body>Bad Gateway</body></html>"),
    httpx.Response(500, text=""),
    httpx.Response(500, json={"detail": "no error key"}),
    httpx.Response(500, json={"error": "a string, not an object"}),
    httpx.Response(500, json=["a", "list"]),
    httpx.Response(500, content=b"\xff\xfe not text"),
], ids=["html", "empty", "no-error-key", "error-string", "json-list", "bytes"])
def test_bodies_that_are_not_openai_errors_are_refusals_with_their_text(response):
    problem = _error_for(response)
    assert type(problem) is ServerRefused
    assert str(problem).startswith(f"HTTP {response.status_code} None: ")
    assert response.text[:200] in str(problem)


def test_a_non_json_body_still_counts_for_its_status():
    assert type(_error_for(httpx.Response(401, text="Unauthorized"))) is NotAllowed
    # Without the body's code the chat cannot tell a full queue from anything else.
    assert type(_error_for(httpx.Response(503, text="Service Unavailable"))) is ServerRefused


def test_a_long_body_is_cut_for_the_log():
    problem = _error_for(httpx.Response(500, text="x" * 5000))
    assert str(problem) == "HTTP 500 None: " + "x" * 200


# -- the event reader, over httpx's own streaming

def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def delta(content: str | None = None, finish_reason: str | None = None, **extra) -> dict:
    body = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": body, "finish_reason": finish_reason}],
            **extra}


ROLE = {"object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
FINISH = delta(None, "stop", timings={"predicted_n": 3, "predicted_per_second": 41.5})


async def events_of(body: bytes | list[bytes]) -> AsyncIterator[str | AnswerEnd]:
    """What _read_events makes of a streamed 200 response with this body (a list: sent in these parts)."""
    async def parts() -> AsyncIterator[bytes]:
        for part in body:
            yield part

    def reply(request: httpx.Request) -> httpx.Response:
        content = parts() if isinstance(body, list) else body
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)

    async with httpx.AsyncClient(transport=httpx.MockTransport(reply), base_url="http://kiosk.test") as client, \
            client.stream("POST", "/v1/chat/completions", json={}) as response:
        async for piece in _read_events(response):
            yield piece


def read(body: bytes | list[bytes]) -> list[str | AnswerEnd]:
    async def collect() -> list[str | AnswerEnd]:
        return [piece async for piece in events_of(body)]
    return asyncio.run(collect())


def test_the_answer_arrives_piece_by_piece_then_ends_with_its_speed():
    body = sse(ROLE, delta("The capital"), delta(" is"), delta(" Paris."), FINISH, "[DONE]")
    assert read(body) == ["The capital", " is", " Paris.", AnswerEnd(41.5)]


def test_events_split_anywhere_over_the_network_read_the_same():
    body = sse(ROLE, delta("¡Hola!"), delta(" 🦜"), FINISH, "[DONE]")
    for size in (1, 2, 7):
        parts = [body[i:i + size] for i in range(0, len(body), size)]
        assert read(parts) == ["¡Hola!", " 🦜", AnswerEnd(41.5)], size


def test_empty_and_missing_content_yield_nothing():
    body = sse(ROLE, delta(""), delta(None), {"choices": []}, delta("word"), FINISH, "[DONE]")
    assert read(body) == ["word", AnswerEnd(41.5)]


def test_the_speed_comes_from_the_chunk_that_finishes_the_answer():
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 3},
             "timings": {"predicted_per_second": 999.0}}  # include_usage's chunk comes after, and is not the answer's
    body = sse(delta("a"), delta(None, "length", timings={"predicted_per_second": 12.25}), usage, "[DONE]")
    assert read(body) == ["a", AnswerEnd(12.25)]


def test_a_finish_without_timings_or_no_finish_at_all_has_no_speed():
    assert read(sse(delta("a"), delta(None, "stop"), "[DONE]")) == ["a", AnswerEnd(None)]
    assert read(sse(delta("a"), "[DONE]")) == ["a", AnswerEnd(None)]
    assert read(sse(delta("a"))) == ["a", AnswerEnd(None)]  # the stream just ended


def test_nothing_after_done_is_read():
    body = sse(delta("a"), FINISH, "[DONE]", delta("ghost"), {"error": {"message": "late"}})
    assert read(body) == ["a", AnswerEnd(41.5)]


def test_lines_that_are_not_data_are_skipped():
    body = (b": keep-alive\n\nevent: message\nid: 1\nretry: 100\n" + sse(delta("a")) +
            b'data:{"choices": [{"delta": {"content": "b"}, "finish_reason": null}]}\n\n' + sse("[DONE]"))
    assert read(body) == ["a", "b", AnswerEnd(None)]


def test_an_error_event_mid_answer_is_a_refusal_after_the_text_so_far():
    failed = {"error": {"message": "generation failed: decode error", "type": "server_error"}}
    body = sse(ROLE, delta("Half an"), failed, "[DONE]")
    pieces = []

    async def collect() -> None:
        async for piece in events_of(body):
            pieces.append(piece)

    with pytest.raises(ServerRefused, match="generation failed: decode error"):
        asyncio.run(collect())
    assert pieces == ["Half an"]


# -- the whole request, against a real HTTP server on loopback

class CannedServer:
    """Answers every POST with the next canned (status, headers, body parts); a body part of None cuts the
    connection there, as a server that crashes mid-answer does."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, str], list[bytes | None]]] = []
        self.requests: list[tuple[dict[str, str], dict]] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                canned.requests.append((dict(self.headers), body))
                status, headers, parts = canned.replies.pop(0)
                self.send_response(status)
                for name, value in {"Content-Type": "text/event-stream", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in parts:
                    if part is None:
                        self.wfile.flush()
                        self.close_connection = True
                        return  # no final chunk: the answer is cut off
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    server = CannedServer()
    thread = threading.Thread(target=server.http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.http.shutdown()
        server.http.server_close()
        thread.join()


def chat(url: str, api_key: str | None = None) -> list[str | AnswerEnd]:
    async def scenario():
        client = ParrotClient(url, api_key)
        try:
            return [piece async for piece in client.stream_chat("m", [{"role": "user", "content": "Hi"}])]
        finally:
            await client.aclose()
    return asyncio.run(scenario())


def test_a_streamed_answer_over_http(canned):
    canned.replies.append((200, {}, [sse(ROLE), sse(delta("Hel")), sse(delta("lo")), sse(FINISH, "[DONE]")]))
    assert chat(canned.url + "/", api_key="classroom-key") == ["Hel", "lo", AnswerEnd(41.5)]
    headers, body = canned.requests[0]
    assert headers["Authorization"] == "Bearer classroom-key"
    assert body == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


def test_an_error_status_over_http_is_read_whole_and_mapped(canned):
    canned.replies.append((503, {"Content-Type": "application/json", "Retry-After": "4"},
                           [json.dumps(error_body("queue_full")).encode()]))
    with pytest.raises(ServerBusy) as busy:
        chat(canned.url)
    assert busy.value.retry_after == 4


def test_an_answer_cut_off_mid_stream_means_the_server_went_away(canned):
    canned.replies.append((200, {}, [sse(ROLE), sse(delta("Half")), None]))
    with pytest.raises(ServerUnavailable):
        chat(canned.url)


def test_no_server_at_all_means_it_is_not_up_yet():
    with pytest.raises(ServerUnavailable):
        chat(f"http://127.0.0.1:{free_port()}")
