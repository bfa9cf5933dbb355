"""A real `parrot-edge serve` on loopback, driven by the real `openai` client and raw HTTP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import PARROT_EDGE, free_port, run_server, wait_until

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gguf(default_gguf, tmp_path_factory):
    """The default model under its catalog name: a path's file name is the served model id."""
    named = tmp_path_factory.mktemp("model") / f"{MODEL}.gguf"
    shutil.copy(default_gguf, named)
    return named


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    with run_server(tmp, "--model", str(gguf), "--slots", "2", "--ctx", "512",
                    env={"PARROT_EDGE_QUEUE_SIZE": "1", "PARROT_EDGE_DEFAULT_MAX_TOKENS": "16"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)


def post(server, path: str, body, key: str | None = None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def test_openai_client_non_streaming(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                           temperature=0, max_tokens=20)
    assert reply.choices[0].message.role == "assistant"
    assert "4" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 20
    assert reply.model_extra["timings"]["predicted_per_second"] > 0


def test_openai_client_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "¿Cómo estás?"}],
                                            temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_same_seed_same_answer_and_completions_endpoint(client):
    def sample():
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         top_p=0.9, seed=1234, presence_penalty=0.5, frequency_penalty=0.5,
                                         extra_body={"top_k": 50, "min_p": 0.02, "repeat_penalty": 1.1})
    first, second = sample(), sample()
    assert first.choices[0].text == second.choices[0].text and first.choices[0].text
    assert first.object == "text_completion"


def test_stop_strings(client):
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6,", max_tokens=30, temperature=0,
                                      stop=[" 9"])
    assert " 9" not in reply.choices[0].text and reply.choices[0].finish_reason == "stop"
    assert "8" in reply.choices[0].text


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["slots"]["total"] == 2 and health["slots"]["context_per_slot"] == 512
    metrics = httpx.get(server.url + "/metrics").text
    assert 'parrot_edge_requests_total{endpoint="chat",outcome="ok"}' in metrics
    for name in ("parrot_edge_completion_tokens_total", "parrot_edge_time_to_first_token_seconds_bucket",
                 "parrot_edge_decode_tokens_per_second_count", "parrot_edge_queue_depth", "parrot_edge_slots_busy",
                 "parrot_edge_batch_tokens_bucket"):
        assert name in metrics
    steps = next(line for line in metrics.splitlines() if line.startswith("parrot_edge_engine_steps_total "))
    assert float(steps.split()[1]) > 0
    assert "parrot_edge_borrowed_tokens_total " in metrics and "parrot_edge_reevaluated_tokens_total " in metrics
    assert "parrot_edge_guessed_tokens_total " in metrics


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "not valid JSON"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "at least 1"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
])
def test_bad_requests_get_clear_errors(server, body, status, needle):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_prompt_over_the_context(server):
    response = post(server, "/v1/chat/completions",
                    {"model": MODEL, "messages": [{"role": "user", "content": "la " * 600}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["context_limit"] == 512 and error["prompt_tokens"] > 512
    assert str(error["prompt_tokens"]) in error["message"]


def _stream_in_background(server, max_tokens: int) -> threading.Thread:
    def consume():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                                "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]},
                          ) as response:
            for _ in response.iter_lines():
                pass
    thread = threading.Thread(target=consume)
    thread.start()
    return thread


def test_full_queue_is_503_with_retry_after(server):
    # two slots and a queue of one: the fourth concurrent request is refused, not held forever
    threads = [_stream_in_background(server, 300) for _ in range(3)]

    def both_slots_busy_and_one_waiting() -> bool:  # a queue of one alone may be a burst still gathering
        health = httpx.get(server.url + "/health").json()
        return health["slots"]["busy"] == 2 and health["queue"]["depth"] == 1

    wait_until(both_slots_busy_and_one_waiting, "both slots busy and one request waiting")
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) >= 1
    for thread in threads:
        thread.join()


def test_client_disconnect_frees_the_slot(server, client):
    body = json.dumps({"model": MODEL, "max_tokens": 400, "stream": True,
                       "messages": [{"role": "user", "content": "Count slowly to one thousand."}]}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data:") < 4:
            received += sock.recv(4096)
    # the socket is closed mid-stream: the slot must be free again almost at once
    wait_until(lambda: httpx.get(server.url + "/health").json()["slots"]["busy"] == 0, "the slot to be freed")
    assert 'outcome="disconnected"' in httpx.get(server.url + "/metrics").text
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8)
    assert reply.choices[0].message.content


def test_api_key_required_off_loopback(gguf, tmp_path):
    port = free_port()
    refused = subprocess.run([*PARROT_EDGE, "serve", "--model", str(gguf), "--host", "0.0.0.0",
                              "--port", str(port)], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "PARROT_EDGE_DATA_DIR": str(tmp_path)})
    assert refused.returncode == 1 and "without an API key" in refused.stderr

    with run_server(tmp_path, "--model", str(gguf), "--slots", "1", host="0.0.0.0",
                    env={"PARROT_EDGE_API_KEY": "s3cret"}) as server:
        assert httpx.get(server.url + "/health").status_code == 200  # health stays public
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert post(server, "/v1/chat/completions", body).status_code == 401
        wrong = post(server, "/v1/chat/completions", body, key="nope")
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        keyed = openai.OpenAI(base_url=server.api, api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=4).choices


def test_too_many_slots_is_refused_by_the_configuration(gguf, tmp_path):
    refused = subprocess.run([*PARROT_EDGE, "serve", "--model", str(gguf), "--slots", "65"],
                             capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "PARROT_EDGE_DATA_DIR": str(tmp_path)})
    assert refused.returncode == 1 and "slots" in refused.stderr and "64" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_server_refuses_a_damaged_model(default_gguf, tmp_path, damage):
    data_dir = tmp_path / "data"
    add = subprocess.run([*PARROT_EDGE, "models", "add", str(default_gguf), "--name", "victim"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                              "PARROT_EDGE_DATA_DIR": str(data_dir)})
    assert add.returncode == 0, add.stderr
    stored = next((data_dir / "models" / "victim").glob("*.gguf"))
    raw = bytearray(stored.read_bytes())
    if damage == "truncate":
        stored.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0xFF
        stored.write_bytes(raw)
    with run_server(tmp_path, "--model", "victim", wait=False) as server:
        assert server.process.wait(60) != 0
    log = server.log()
    assert "victim" in log and ("truncated" in log or "sha256" in log), log
    assert "Traceback" not in log


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_never_5xx(server, mode):
    """Property test over our own OpenAPI spec: valid and invalid requests alike never produce a 5xx."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    strategy = st.one_of([op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)) for op in operations])

    @given(case=strategy)
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 4)  # keep each generated request short
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

    check()


# Bodies a careless or hostile client may send, as raw bytes: every one gets a 4xx with an OpenAI-style error.
RAW_BODIES = [
    b"", b"null", b"[]", b"42", b'"text"', b"{", b'{"model": ', b"\xff\xfe\x00{}", b'{"model": "m"}',
    b'{"model": "' + MODEL.encode() + b'", "messages": []}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user"}]}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": {"a": 1}}]}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' * 5000 + b"1" + b"}" * 5000,
]


@pytest.mark.parametrize("body", RAW_BODIES, ids=lambda body: repr(body[:40]))
def test_raw_json_edge_cases_are_4xx_with_a_message(server, body):
    response = post(server, "/v1/chat/completions", body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["error"]["message"]


_OFFLINE_ROUND_TRIP = r"""
import socket, sys
import openai
sys.path.insert(0, sys.argv[3])
from serving import run_server
from pathlib import Path
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    sys.exit("this namespace can reach the network")
except OSError:
    pass
with run_server(Path(sys.argv[1]), "--model", sys.argv[2], "--slots", "1") as server:
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=Path(sys.argv[2]).stem, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is 2+2?"}])
    print("ANSWER:", reply.choices[0].message.content)
"""


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
def test_chat_round_trip_with_no_network_at_all(gguf, tmp_path):
    """The whole round trip in a network namespace that has only loopback: nothing needs the internet."""
    script = f"ip link set lo up && exec {sys.executable} -c '{_OFFLINE_ROUND_TRIP}' {tmp_path} {gguf} " \
             f"{Path(__file__).parent}"
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ANSWER: " in done.stdout and len(done.stdout.split("ANSWER: ", 1)[1].strip()) > 0


def test_tiny_converted_model_served_with_the_default_template(tiny_gguf, tmp_path):
    """A model made by the converter in this run, served and chatted with through the openai client."""
    with run_server(tmp_path, "--model", str(tiny_gguf), "--slots", "2", "--ctx", "256") as server:
        client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-parrot"]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hola, ¿qué tal?"}]
        whole = client.chat.completions.create(model="tiny-parrot", messages=messages, max_tokens=12,
                                               temperature=0)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="tiny-parrot", messages=messages, max_tokens=12, temperature=0, stream=True) if chunk.choices)
        assert whole.usage.completion_tokens > 0
        assert streamed == whole.choices[0].message.content
        assert "\nUser:" not in whole.choices[0].message.content  # the default template's stop string holds
