"""Hostile input against a real server on 127.0.0.1: bodies that amplify memory, bytes that used to make 500s,
headers and bodies that never finish, too many connections, cross-site requests, oversized parameters,
routes behind the key; and a bounded schema-driven fuzz run. Every wait is bounded."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.embeddings import _chunk, _chunk_counts
from server.security import secure
from tests.server_harness import API_KEY, RunningServer, server_processes, tiny_checkpoint

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = RunningServer(tiny_checkpoint(tmp_path_factory.mktemp("abuse") / "tiny"),
                            "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                            "--max-connections", str(MAX_CONNECTIONS), "--max-header-bytes", "16384")
    yield running
    running.stop()


def rss_mib(server) -> float:
    total = 0
    for pid in server_processes(server):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def raw_connection(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection (or answers and closes) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


# ---- limits checked before the work they guard ------------------------------------------------------------
def test_overlapping_chunks_are_refused_by_arithmetic_before_any_memory_is_spent(server):
    before = rss_mib(server)
    started = time.monotonic()
    with server.client() as client:
        overlap = client.post("/v1/embeddings", json={"input": "x" * 25_000,
                                                      "chunking": {"size": 512, "overlap": 511}})
        returned = client.post("/v1/embeddings", json={"input": "x" * 16_000,
                                                       "chunking": {"size": 1, "return_chunks": True}})
    assert time.monotonic() - started < 5
    assert overlap.status_code == 400 and overlap.json()["error"]["code"] in ("too_many_chunks",
                                                                             "exceeds_queue_limit")
    assert returned.status_code == 400 and returned.json()["error"]["code"] == "too_many_chunks"
    assert rss_mib(server) - before < 64


@pytest.mark.parametrize("length", [1, 5, 100, 256, 257, 700, 1000])
@pytest.mark.parametrize("size, overlap", [(256, 32), (10, 9), (7, 0), (1, 0)])
def test_chunk_arithmetic_counts_what_slicing_makes(length, size, overlap):
    chunking = SimpleNamespace(size=size, overlap=overlap)
    pieces = _chunk(length, chunking)
    assert _chunk_counts(length, chunking) == (len(pieces), sum(end - begin for begin, _, end in pieces))
    assert [start for _, start, _ in pieces] == [0] + [end for _, _, end in pieces[:-1]]  # they tile the input
    assert pieces[-1][2] == length and all(begin <= start < end for begin, start, end in pieces)
    if length > size:  # full windows, each with at least `overlap` tokens of context after the first
        assert all(end - begin == size for begin, _, end in pieces)
        assert all(start - begin >= overlap for begin, start, _ in pieces[1:])


# ---- bytes that used to make 500s -------------------------------------------------------------------------
HOSTILE_BODIES = [
    ("/v1/completions", b'{"prompt": "\\ud800 lone", "max_tokens": 2}'),
    ("/v1/embeddings", b'{"input": ["fine", "\\udfff"]}'),
    ("/tokenize", b'{"prompt": "\\ud800"}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
]


@pytest.mark.parametrize("path, body", HOSTILE_BODIES)
def test_hostile_bytes_get_a_400_and_the_connection_stays_usable(server, path, body):
    rejected = server.metric('reformer:requests_rejected_total{status="400",code="invalid_json"}')
    with server.client(limits=httpx.Limits(max_connections=1)) as client:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"
        after = client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2})  # same connection
        assert after.status_code == 200
    assert server.metric('reformer:requests_rejected_total{status="400",code="invalid_json"}') == rejected + 1


# ---- connections -------------------------------------------------------------------------------------------
def test_oversized_headers_are_refused_without_delaying_others(server):
    """Past --max-header-bytes the server answers 400 and closes; a client still writing its megabyte of
    header may see the close instead of the answer. Either way it is at once, and nobody else waits."""
    started = time.monotonic()
    try:
        status = httpx.get(f"{server.url}/v1/models", headers={"X-Padding": "p" * 1_000_000}, timeout=10).status_code
    except httpx.TransportError:
        status = None
    assert status in (400, None) and time.monotonic() - started < 3
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_headers_over_the_cap_are_refused_even_when_they_arrive_whole(server):
    """h11's own cap looks only at headers still incomplete: 20 KB sent in one write passed a 16 KiB cap. The
    count holds across writes and starts again for the next request on a kept-alive connection."""
    def answer(writes: list[bytes]) -> bytes:
        sock = raw_connection(server)
        for data in writes:
            sock.sendall(data)
            time.sleep(0.05)
        received = b""
        sock.settimeout(10)
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
        sock.close()
        return received

    def request(padding: int, end: bytes = b"\r\n\r\n") -> bytes:
        return b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * padding + end

    whole = request(20_000)
    assert answer([whole]).startswith(b"HTTP/1.1 400")
    assert answer([whole[:9_000], whole[9_000:]]).startswith(b"HTTP/1.1 400")
    assert answer([request(20_000, b"\n\n")]).startswith(b"HTTP/1.1 400")
    assert answer([request(12_000)]).startswith(b"HTTP/1.1 200")
    with httpx.Client(base_url=server.url, timeout=10) as client:  # one connection, two requests under the cap
        assert [client.get("/health", headers={"X-Padding": "p" * 12_000}).status_code for _ in range(2)] == [200, 200]


def test_connections_that_never_finish_their_headers_are_closed(server):
    silent, partial = raw_connection(server), raw_connection(server)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert closed_within(silent, HEADER_TIMEOUT + 3) and closed_within(partial, HEADER_TIMEOUT + 3)


def test_a_body_that_stops_arriving_gets_a_408(server):
    sock = raw_connection(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    sock.settimeout(BODY_TIMEOUT + 5)
    started = time.monotonic()
    answer = b""
    while chunk := sock.recv(65536):  # headers and body may come in separate reads; the server then closes
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert time.monotonic() - started < BODY_TIMEOUT + 3


def test_connections_beyond_the_cap_are_closed_at_once(server):
    held = [raw_connection(server) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = raw_connection(server)
        assert closed_within(extra, 2)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_a_client_that_leaves_mid_body_is_one_log_line_not_a_traceback(server):
    for _ in range(5):
        sock = raw_connection(server)
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"input\"")
        time.sleep(0.1)
        sock.close()
    time.sleep(1)
    assert "Traceback" not in server.log_text()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


# ---- who may call ------------------------------------------------------------------------------------------
def test_only_json_bodies_are_accepted(server):
    with server.client() as client:
        plain = client.post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
        form = client.post("/v1/completions", data={"prompt": "x"})
        zipped = client.post("/v1/completions", content=gzip.compress(b'{"prompt": "x"}'),
                             headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    assert form.status_code == 415
    assert zipped.status_code == 415 and "gzip" in zipped.json()["error"]["message"]  # not "invalid JSON"


def test_no_cors_headers_unless_configured(server):
    preflight = httpx.options(f"{server.url}/v1/completions", timeout=5, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    app = FastAPI()
    app.post("/v1/completions")(lambda: {})
    secure(app, None, ["https://app.example"])
    sdk_headers = "authorization,content-type,x-stainless-lang,x-stainless-os,x-stainless-retry-count"
    allowed = TestClient(app).options("/v1/completions", headers={  # what the openai JS SDK's preflight asks
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": sdk_headers})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    answered = TestClient(app).post("/v1/completions", headers={"Origin": "https://app.example"})
    assert "retry-after" in answered.headers["access-control-expose-headers"].lower()


def test_every_answer_carries_a_request_id_and_a_clients_own_is_echoed(server):
    refused = httpx.get(f"{server.url}/v1/models", timeout=5)
    with server.client() as client:
        echoed = client.get("/v1/models", headers={"X-Request-Id": "trace-42"})
        hostile = client.get("/v1/models", headers={"X-Request-Id": "x" * 500})
    assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req_")
    assert echoed.headers["x-request-id"] == "trace-42"
    assert hostile.headers["x-request-id"].startswith("req_")  # too long to echo into our logs and answers
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    completion = sdk.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert completion._request_id.startswith("req_")


def test_every_route_but_the_probes_needs_the_key(server):
    for path in ("/info", "/openapi.json", "/", "/litserve/health", "/litserve/info", "/v1/models"):
        assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 401, path
        keyed = httpx.get(f"{server.url}{path}", headers={"X-API-Key": API_KEY}, timeout=5)
        assert keyed.status_code != 401, path
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200, path


# ---- oversized parameters ---------------------------------------------------------------------------------------
OVERSIZED = [
    ({"stop_token_ids": list(range(1_000_000))}, "stop_token_ids"),
    ({"stop": "s" * 100_000}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["s" * 300]}, "stop"),
    ({"logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 17}, "n"),
    ({"prompt": ["p"] * 300}, "prompt"),
    ({"allowed_token_ids": [7], "stop_token_ids": [7], "min_tokens": 2}, "allowed_token_ids"),
    ({"stop_token_ids": list(range(258)), "min_tokens": 2}, "stop_token_ids"),  # every token of the tiny model
]


def test_parameter_values_that_overflow_the_arithmetic_still_sample(server):
    """Found by the fuzzer: repetition_penalty=1e-120 divides a logit into infinity."""
    with server.client() as client:
        for extra in ({"repetition_penalty": 1e-120}, {"temperature": 1e-300}, {"repetition_penalty": 1e-120,
                                                                                  "temperature": 0.5}):
            response = client.post("/v1/completions", json={"prompt": "x x x", "max_tokens": 5, **extra})
            assert response.status_code == 200, (extra, response.text)


@pytest.mark.parametrize("extra, param", OVERSIZED)
def test_oversized_parameters_are_refused_by_name(server, extra, param):
    with server.client() as client:
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if param in ("stop", "prompt"):  # union fields: the error of the branch that was sent, not another's type
        assert response.json()["error"]["code"] == "invalid_value" and "at most" in response.json()["error"]["message"]


# ---- a schema-driven fuzzer ------------------------------------------------------------------------------------
def test_schema_driven_fuzzing_finds_no_server_error(server, tmp_path):
    """schemathesis over every POST route of /openapi.json, bounded in examples and time; then a normal
    request still succeeds."""
    command = [shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis", "run",
               f"{server.url}/openapi.json", "--checks", "not_a_server_error", "--include-method", "POST",
               "--max-examples", "25", "--seed", "1", "--header", f"Authorization: Bearer {API_KEY}",
               "--request-timeout", "30", "--no-color"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    generated = int(re.search(r"(\d+) generated", result.stdout).group(1))
    assert generated >= 500, result.stdout[-2000:]  # the bodies are documented, so there is something to fuzz
    with server.client() as client:
        assert client.post("/v1/completions", json={"prompt": "after the fuzzer", "max_tokens": 2}).status_code == 200
