"""The request lifecycle under real faults, against a real `python -m server` on 127.0.0.1: clients that give
up, a pathological request beside others, deadlines, requests that can never fit, a SIGKILLed engine worker,
signals to the whole process group, and a drain that runs out of time. Every wait here is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from server.lifecycle import (ENGINE_STUCK_AFTER, SHUTDOWN_OVERHEAD, STOP_GRACE, UVICORN_GRACE, WORKER_JOIN,
                              SharedState)
from tests.server_harness import (API_KEY, RunningServer, engine_pid, http_pids, server_processes,
                                  tiny_checkpoint)

CONTEXT = 8192  # long enough for streams that outlast a test's fault
LONG = 6000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("lifecycle") / "tiny", context=CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = RunningServer(checkpoint, "--max-running", "2", "--max-queued-requests", "3",
                            "--max-queued-tokens", "70000")
    yield running
    running.stop()


class Stream:
    """A streaming completion read in a thread the way strict clients read it: data events only."""

    def __init__(self, url: str, payload: dict, headers: dict | None = None):
        self.events: list = []
        self.started = threading.Event()
        self.ended_at: float | None = None
        self.status: int | None = None
        self.thread = threading.Thread(target=self._read, args=(url, {**payload, "stream": True}, headers or {}))
        self.thread.start()

    def _read(self, url, payload, headers):
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, headers=headers, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                    self.started.set()
        self.ended_at = time.monotonic()
        self.started.set()

    def join(self, timeout: float) -> list:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.events

    @property
    def text(self) -> str:
        return "".join(e["choices"][0]["text"] for e in self.events if isinstance(e, dict) and e.get("choices"))


def wait_until(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def headers(extra: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {API_KEY}", **(extra or {})}


# ---- admission ----------------------------------------------------------------------------------------------
def test_clients_that_time_out_leave_no_admission_behind(server, checkpoint):
    """Five non-streaming clients (and one embedding client) give up; the idle server then serves at once.
    Before, each abandoned request kept its admission: after --max-queued-requests of them, 429 for good."""
    long_document = [[5 + i % 200 for i in range(CONTEXT)]] * 8
    for _ in range(5):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json={"prompt": "wait", "max_tokens": LONG},
                       headers=headers(), timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/embeddings", json={"input": long_document}, headers=headers(), timeout=0.2)
    assert wait_until(lambda: server.metric("vllm:num_requests_running") == 0
                      and server.metric("vllm:num_requests_waiting") == 0, 10)
    with server.client() as client:
        for _ in range(4):  # more than --max-queued-requests, one after another
            response = client.post("/v1/completions", json={"prompt": "served", "max_tokens": 2})
            assert response.status_code == 200, response.text
    assert server.metric('vllm:request_success_total{finished_reason="abort"}') >= 5


def test_a_request_that_can_never_fit_the_queue_is_a_400_not_a_429(server):
    """More tokens than --max-queued-tokens (70000 here) would be refused on an idle server every time: a 429
    would make clients retry it forever."""
    with server.client() as client:
        response = client.post("/v1/embeddings", json={"input": "y" * 80_000, "chunking": {"size": 8192}})
    assert_never_fits(response, "input", 70000)


def assert_never_fits(response: httpx.Response, param: str, limit: int) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "exceeds_queue_limit" and error["param"] == param
    assert "--max-queued-tokens" in error["message"] and str(limit) in error["message"]


# ---- a bad request beside good ones ----------------------------------------------------------------------
def test_a_pathological_temperature_leaves_the_streams_beside_it_intact(server):
    """temperature=1e-300 passes the range check; logits / 1e-300 is infinite. It samples greedily now, and
    the streams decoding in the same batch finish as they would alone."""
    payload = {"prompt": "neighbour", "max_tokens": 300, "temperature": 0}
    stream = Stream(server.url, payload, headers())
    assert stream.started.wait(30)
    with server.client() as client:
        odd = client.post("/v1/completions", json={"prompt": "neighbour", "max_tokens": 20, "temperature": 1e-300})
        alone = client.post("/v1/completions", json=payload).json()["choices"][0]
    events = stream.join(60)
    assert odd.status_code == 200, odd.text
    assert odd.json()["choices"][0]["text"] == alone["text"][:len(odd.json()["choices"][0]["text"])]
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert stream.text == alone["text"]


# ---- deadlines ---------------------------------------------------------------------------------------------
def test_a_stream_past_its_deadline_ends_with_a_timeout_error_event(server):
    stream = Stream(server.url, {"prompt": "slow", "max_tokens": LONG}, headers({"X-Request-Timeout": "0.5"}))
    events = stream.join(30)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "timeout" and events[-2]["error"]["type"] == "timeout_error"
    reasons = {c["finish_reason"] for e in events[:-2] for c in e["choices"]}
    assert reasons <= {None}  # no "cancelled", no made-up finish reason


def test_a_non_streaming_timeout_is_not_retried_by_the_openai_sdk(server):
    before = server.metric('reformer:requests_failed_total{code="timeout"}')
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=2)
    with pytest.raises(openai.InternalServerError) as error:
        client.completions.create(model="tiny", prompt="slow", max_tokens=LONG,
                                  extra_headers={"X-Request-Timeout": "0.3"})
    assert error.value.status_code == 504 and error.value.response.headers["x-should-retry"] == "false"
    assert server.metric('reformer:requests_failed_total{code="timeout"}') - before == 1  # one attempt only


# ---- a dead engine worker ------------------------------------------------------------------------------------
def test_a_killed_engine_worker_fails_its_requests_at_once_and_is_restarted(checkpoint):
    running = RunningServer(checkpoint, "--max-running", "4")
    try:
        stream = Stream(running.url, {"prompt": "doomed", "max_tokens": LONG}, headers())
        plain: dict = {}
        thread = threading.Thread(target=lambda: plain.update(response=httpx.post(
            f"{running.url}/v1/completions", json={"prompt": "doomed too", "max_tokens": LONG}, headers=headers(),
            timeout=60)))
        thread.start()
        assert stream.started.wait(30)
        worker = engine_pid(running)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        unhealthy = wait_until(lambda: httpx.get(f"{running.url}/health", timeout=2).status_code == 503, 5, 0.05)
        events = stream.join(10)
        thread.join(10)
        assert unhealthy
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_unavailable"
        assert stream.ended_at - killed < 3
        response = plain["response"]
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        assert wait_until(lambda: httpx.get(f"{running.url}/ready", timeout=2).status_code == 200, 90, 0.2)
        restart = time.monotonic() - killed
        print(f"engine restarted and ready {restart:.1f} s after SIGKILL")
        assert engine_pid(running) not in (None, worker)
        with running.client() as client:
            assert client.post("/v1/completions", json={"prompt": "again", "max_tokens": 3}).status_code == 200
        assert running.metric("vllm:num_requests_running") == 0
    finally:
        assert running.stop() == 0


def test_an_engine_that_keeps_dying_ends_the_server_with_exit_code_1(checkpoint):
    running = RunningServer(checkpoint)
    killed: set[int] = set()
    deadline = time.monotonic() + 90
    while running.process.poll() is None and time.monotonic() < deadline:
        worker = engine_pid(running)
        if worker is not None and worker not in killed:
            os.kill(worker, signal.SIGKILL)
            killed.add(worker)
        time.sleep(0.05)
    assert running.process.wait(timeout=30) == 1
    assert len(killed) >= 4  # the first worker and three restarts (a fifth may start before the exit)
    running.stop()


def test_a_dead_http_process_ends_the_server_with_exit_code_1(checkpoint):
    """Nothing restarts an HTTP process, and its socket stays bound in the main process (connections would
    hang): the server must end, so that its supervisor starts it again."""
    running = RunningServer(checkpoint)
    (http,) = http_pids(running)
    os.kill(http, signal.SIGKILL)
    assert running.process.wait(timeout=30) == 1
    assert "an HTTP process died" in running.log_text()
    assert wait_until(lambda: not server_processes(running), 10), server_processes(running)
    running.stop()


def start_and_act_while_loading(checkpoint, act) -> RunningServer:
    """A server whose engine worker is acted on as soon as it exists (it then imports torch for seconds)."""
    running = RunningServer(checkpoint, "--log-level", "info", ready_timeout=None)
    assert wait_until(lambda: engine_pid(running) is not None, 60, 0.02)
    act(running)
    return running


def test_an_engine_that_dies_while_loading_ends_the_server_with_exit_code_1(checkpoint):
    running = start_and_act_while_loading(checkpoint, lambda r: os.kill(engine_pid(r), signal.SIGKILL))
    assert running.process.wait(timeout=30) == 1  # LitServe alone waited for it forever
    assert "died while loading the model" in running.log_text() and "Traceback" not in running.log_text()
    assert wait_until(lambda: not server_processes(running), 10), server_processes(running)
    running.stop()


def test_a_signal_while_the_model_loads_stops_the_server_at_once(checkpoint):
    running = start_and_act_while_loading(checkpoint, lambda r: os.kill(r.process.pid, signal.SIGTERM))
    assert running.process.wait(timeout=WORKER_JOIN + 10) == 0
    assert "stopped before the model was loaded" in running.log_text()  # LitServe alone waited for the load
    assert wait_until(lambda: not server_processes(running), 10), server_processes(running)
    running.stop()


def test_an_engine_loop_that_hangs_counts_as_a_dead_engine():
    """The heartbeat thread beats on while the loop's thread is stuck (a CUDA op that never returns)."""
    shared = SharedState()
    shared.start_heartbeat()
    assert shared.engine_alive()  # loading: the loop has not run yet
    shared.loop_beat()
    assert shared.engine_alive()
    shared._loop_beat.value = time.monotonic() - ENGINE_STUCK_AFTER - 1
    assert not shared.engine_alive()
    shared.start_heartbeat()  # a new worker: its loop has not run yet
    assert shared.engine_alive()


# ---- signals and the drain -------------------------------------------------------------------------------------
def test_sigint_to_the_process_group_drains_like_sigterm(checkpoint):
    """Ctrl-C (or systemd's stop) signals every process of the group; the stream in flight still completes
    and the server exits 0, with nothing left behind."""
    running = RunningServer(checkpoint, "--drain-timeout", "60", api_key=None)
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    pieces, finish = [], []
    started = threading.Event()

    def consume():
        for chunk in client.completions.create(model="tiny", prompt="drain me", max_tokens=1500, temperature=0,
                                               stream=True):
            pieces.append(chunk.choices[0].text)
            finish.append(chunk.choices[0].finish_reason)
            started.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(30)
    os.killpg(running.process.pid, signal.SIGINT)
    signalled = time.monotonic()
    time.sleep(0.3)
    refused = httpx.post(f"{running.url}/v1/completions", json={"prompt": "late"}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    thread.join(120)
    assert not thread.is_alive() and finish[-1] == "length" and len(finish) == 1500  # one chunk per token
    assert running.process.wait(timeout=30) == 0
    took = time.monotonic() - signalled
    assert took < 60 + SHUTDOWN_OVERHEAD
    assert wait_until(lambda: not server_processes(running), 10), server_processes(running)
    running.stop()


def test_a_drain_that_runs_out_of_time_ends_streams_with_an_error_and_exits_on_time(checkpoint):
    drain = 4.0
    running = RunningServer(checkpoint, "--drain-timeout", str(drain), "--max-queued-tokens", "1000", api_key=None)
    assert_never_fits(httpx.post(f"{running.url}/v1/completions", json={"prompt": "x" * 2000, "max_tokens": 1}),
                      "prompt", 1000)
    stream = Stream(running.url, {"prompt": "too long to drain", "max_tokens": LONG})
    assert stream.started.wait(30)
    os.killpg(running.process.pid, signal.SIGTERM)  # the whole group, as `docker stop` with tini -g does
    signalled = time.monotonic()
    time.sleep(0.2)
    asked = time.monotonic()
    refused = httpx.post(f"{running.url}/v1/completions", json={"prompt": "late"}, timeout=5)
    assert refused.status_code == 503 and time.monotonic() - asked < drain / 2  # refused, not held to the end
    events = stream.join(30)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
    assert drain - 0.5 < stream.ended_at - signalled < drain + 2
    assert running.process.wait(timeout=30) == 0
    took = time.monotonic() - signalled
    print(f"signal to exit: {took:.1f} s with a {drain:.0f} s drain")
    assert took < drain + SHUTDOWN_OVERHEAD
    assert wait_until(lambda: not server_processes(running), 10), server_processes(running)
    running.stop()


def test_a_request_still_sending_its_body_when_the_drain_begins_is_waited_for(checkpoint):
    """It arrived before the signal: the drain must count it although it is not admitted yet."""
    running = RunningServer(checkpoint, "--drain-timeout", "30", api_key=None)
    body = json.dumps({"prompt": "a slow upload", "max_tokens": 5, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as connection:
        connection.sendall(head + body[:10])
        time.sleep(0.5)  # its handler is reading the body
        os.kill(running.process.pid, signal.SIGTERM)
        time.sleep(STOP_GRACE + UVICORN_GRACE + 1)  # longer than a shutdown that did not wait for it takes
        connection.sendall(body[10:])
        answer = connection.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:400]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["choices"][0]["finish_reason"] == "length"
    assert running.process.wait(timeout=30) == 0
    running.stop()
