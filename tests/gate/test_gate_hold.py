"""The gate against the stand-in vLLM: forwarding, holding, 503s, retry-once, broken
streams, drains. The test plays the daemon (it publishes the views)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import openai
import pytest
from gatehelp import GateDrained, GateRun
from helpers import poll_for

pytestmark = pytest.mark.process

CHAT = {"model": "nika", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def call(url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 20.0,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={
        "content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Background:
    """A request in a thread: its result (or exception) and when it finished."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done_at: float | None = None
        self.started_at = time.monotonic()

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as e:
                self.error = e
            self.done_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 30.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def ready_standin(run_standin: Callable[..., Any], **kw: Any) -> Any:
    s = run_standin(**kw)
    poll_for(lambda: s.state.get("/health")[0] == 200, 15, "the stand-in to answer")
    return s


def kill_group(s: Any) -> None:
    os.killpg(s.pid, signal.SIGKILL)
    s.proc.wait(5)


def test_forwards_every_route_unchanged(run_standin: Callable[..., Any],
                                         make_gate: Callable[..., GateRun]) -> None:
    """Ready: /v1/models, completions, /health, /metrics and an unknown route pass through
    with vLLM's status and body."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    for path in ("/v1/models", "/metrics", "/health", "/no/such/route"):
        direct = s.state.get(path)
        status, _, body = call(g.url, path)
        assert (status, body if path != "/metrics" else body[:40]) == (
            direct[0], direct[1] if path != "/metrics" else direct[1][:40]), path
    status, _, body = call(g.url, "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "pong"


def test_sse_is_forwarded_chunk_by_chunk(run_standin: Callable[..., Any],
                                         make_gate: Callable[..., GateRun]) -> None:
    """Each SSE event reaches the client when vLLM sends it, not when the stream ends."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    client = openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0)
    arrivals, pieces = [], []
    stream = client.chat.completions.create(
        model="nika", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        extra_body={"standin_chunk_delay_s": 0.3})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap > 0.2 for gap in gaps), f"chunks bunched up (buffered): gaps {gaps}"


def test_holds_until_ready_then_forwards(run_standin: Callable[..., Any],
                                         make_gate: Callable[..., GateRun]) -> None:
    """Not ready: the request waits in the gate; the ready view lets it through at once."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("loading", last_load_s=5.0, phase_since=time.monotonic())
    bg = Background(lambda: call(g.url, "/v1/chat/completions", CHAT))
    poll_for(lambda: g.proc.stats.held == 1, 5, "the request to be held")
    assert bg.done_at is None
    assert s.state.state()["counts"].get("POST /v1/chat/completions") is None
    released = time.monotonic()
    g.view("ready")
    status, _, _ = bg.join()
    assert status == 200
    assert bg.done_at is not None and bg.done_at - released < 1.0
    poll_for(lambda: g.proc.stats.held == 0 and g.proc.stats.served >= 1, 5, "stats")


def test_hold_timeout_gives_503_with_retry_after(run_standin: Callable[..., Any],
                                                 make_gate: Callable[..., GateRun]) -> None:
    """Past hold_timeout: 503, Retry-After = last load time minus what has elapsed, and an
    OpenAI-style error naming the phase and the cause."""
    g = make_gate(1, gate="hold_timeout: 500ms\n")
    g.view("loading", cause="vLLM exited (SIGKILL)", last_load_s=40.0,
           phase_since=time.monotonic() - 10.0)
    t0 = time.monotonic()
    status, headers, body = call(g.url, "/v1/chat/completions", CHAT)
    waited = time.monotonic() - t0
    assert status == 503 and 0.45 <= waited < 3.0
    assert headers["Retry-After"] in ("29", "30")
    err = json.loads(body)["error"]
    assert (err["type"], err["code"], err["reason"], err["phase"], err["cause"]) == (
        "service_unavailable", 503, "hold_timeout", "loading", "vLLM exited (SIGKILL)")
    assert "phase: loading" in err["message"] and "SIGKILL" in err["message"]
    client = openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="nika", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    # both counted; the second, within a second of the first, is not logged on its own line
    poll_for(lambda: g.proc.stats.rejected == 2, 5, "two 503s counted")
    assert [r["reason"] for r in g.events_named("gate.rejected")] == ["hold_timeout"]


def test_max_held_overflow_is_503_at_once(make_gate: Callable[..., GateRun]) -> None:
    """Beyond max_held waiting requests, the next one gets 503 at once, not after the wait."""
    g = make_gate(1, gate="hold_timeout: 10s\nmax_held: 2\n")
    g.view("loading")
    held = [Background(lambda: call(g.url, "/v1/models")) for _ in range(2)]
    poll_for(lambda: g.proc.stats.held == 2, 5, "two held requests")
    t0 = time.monotonic()
    status, _, body = call(g.url, "/v1/models")
    assert status == 503 and time.monotonic() - t0 < 1.0
    assert json.loads(body)["error"]["reason"] == "max_held"
    g.view("given_up", ready=False, given_up=True, cause="restart budget exhausted")
    for bg in held:  # the daemon gave up: the held ones are answered at once too
        status, _, body = bg.join(5)
        assert status == 503 and json.loads(body)["error"]["reason"] == "given_up"
    poll_for(lambda: g.proc.stats.rejected == 3, 5, "three 503s counted")


def test_health_never_waits(make_gate: Callable[..., GateRun]) -> None:
    """/health while not ready is 503 at once (a monitor must not hang for hold_timeout)."""
    g = make_gate(1, gate="hold_timeout: 10s\n")
    g.view("backoff", cause="crashed")
    t0 = time.monotonic()
    status, _, _ = call(g.url, "/health")
    assert status == 503 and time.monotonic() - t0 < 1.0


def test_request_failed_before_any_byte_is_retried_after_restart(
        run_standin: Callable[..., Any], make_gate: Callable[..., GateRun]) -> None:
    """vLLM dies under a request that got no byte yet: after the restart the gate sends it
    again, once, and the client sees only a success."""
    s = ready_standin(run_standin)
    g = make_gate(s.port, gate="hold_timeout: 20s\n")
    g.view("ready")
    s.state.control(frozen=True)  # this vLLM never answers: it will die under the request
    bg = Background(lambda: call(g.url, "/v1/chat/completions", CHAT))
    poll_for(lambda: s.state.state()["counts"].get("POST /v1/chat/completions") == 1, 5,
             "the request to reach the stand-in")
    kill_group(s)
    g.view("backoff", cause="vLLM exited (SIGKILL)", last_load_s=1.0,
           phase_since=time.monotonic())
    poll_for(lambda: g.proc.stats.held == 1, 5, "the failed request to be held again")
    s2 = ready_standin(run_standin, port=s.port)
    g.view("ready")
    status, _, body = bg.join()
    assert status == 200, body
    assert s2.state.state()["counts"].get("POST /v1/chat/completions") == 1
    poll_for(lambda: g.proc.stats.retried == 1, 5, "one retry counted")
    assert len(g.events_named("gate.retrying")) == 1


def test_second_failure_is_a_503_not_a_loop(make_gate: Callable[..., GateRun]) -> None:
    """A request vLLM fails twice (nothing listens) gets one retry, then a 503."""
    from helpers import free_port
    g = make_gate(free_port(), gate="hold_timeout: 5s\n")
    g.view("ready")
    status, _, body = call(g.url, "/v1/models")
    assert status == 503 and json.loads(body)["error"]["reason"] == "upstream_failed"
    assert g.proc.stats.retried == 1 or poll_for(lambda: g.proc.stats.retried == 1, 5, "retry")


def test_broken_stream_ends_with_an_error_event(run_standin: Callable[..., Any],
                                                make_gate: Callable[..., GateRun]) -> None:
    """vLLM dies mid-stream: the client gets an SSE error event (the openai SDK raises),
    never a stream that just stops."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    client = openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="nika", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True,
        extra_body={"standin_chunk_delay_s": 0.5})
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
            if len(got) == 1:
                kill_group(s)
    assert got == ["tok0 "]
    assert "failed mid-answer" in str(e.value)
    poll_for(lambda: g.proc.stats.broken_streams == 1, 5, "the broken stream counted")


def test_client_disconnect_aborts_upstream(run_standin: Callable[..., Any],
                                           make_gate: Callable[..., GateRun]) -> None:
    """A client that leaves mid-stream makes the gate close its upstream request."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    client = openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="nika", messages=[{"role": "user", "content": "hi"}], max_tokens=40, stream=True,
        extra_body={"standin_chunk_delay_s": 0.1})
    next(iter(stream))
    stream.close()
    poll_for(lambda: s.state.state()["counts"].get("stream aborted by client") == 1, 10,
             "the stand-in to see the upstream request aborted")
    poll_for(lambda: g.proc.stats.in_flight == 0, 5, "nothing in flight")


def test_drain_waits_for_in_flight_and_holds_new(run_standin: Callable[..., Any],
                                                 make_gate: Callable[..., GateRun]) -> None:
    """drain: in-flight requests finish, new ones wait (not sent to the old vLLM), drained
    is reported when the last one is done; the held ones go to the next vLLM."""
    s = ready_standin(run_standin)
    g = make_gate(s.port, gate="hold_timeout: 20s\n")
    g.view("ready")
    slow = Background(lambda: call(g.url, "/v1/chat/completions",
                                   {**CHAT, "standin_delay_s": 2.0}))
    poll_for(lambda: g.proc.stats.in_flight == 1, 5, "the slow request in flight")
    t0 = time.monotonic()
    g.proc.drain(timeout=10)
    poll_for(lambda: g.proc.stats.draining, 5, "draining")
    new = Background(lambda: call(g.url, "/v1/chat/completions", CHAT))
    poll_for(lambda: g.proc.stats.held == 1, 5, "the new request held")
    drained = g.wait_for(GateDrained, 10)
    assert (drained.in_flight_left, drained.timed_out) == (0, False)
    assert drained.waited_s > 0.3 and time.monotonic() - t0 >= drained.waited_s
    assert slow.join()[0] == 200
    assert s.state.state()["counts"]["POST /v1/chat/completions"] == 1  # the new one waits
    kill_group(s)  # the daemon stops the old vLLM and starts the next
    g.view("stopping")
    s2 = ready_standin(run_standin, port=s.port)
    g.view("ready")
    assert new.join()[0] == 200
    assert s2.state.state()["counts"]["POST /v1/chat/completions"] == 1
    assert [e["event"] for e in g.logs() if e["event"].startswith("gate.drain")] == [
        "gate.drain_started", "gate.drained"]


def test_drain_timeout_reports_what_is_left(run_standin: Callable[..., Any],
                                            make_gate: Callable[..., GateRun]) -> None:
    """A drain that runs out of time reports drained anyway, with the count still in flight."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    Background(lambda: call(g.url, "/v1/chat/completions", {**CHAT, "standin_delay_s": 5}))
    poll_for(lambda: g.proc.stats.in_flight == 1, 5, "in flight")
    g.proc.drain(timeout=0.3)
    drained = g.wait_for(GateDrained, 5)
    assert (drained.in_flight_left, drained.timed_out) == (1, True)
    assert 0.25 < drained.waited_s < 2.0
    g.proc.resume()
    poll_for(lambda: not g.proc.stats.draining, 5, "resumed")
    assert call(g.url, "/v1/models")[0] == 200


def test_held_client_that_leaves_is_dropped(make_gate: Callable[..., GateRun]) -> None:
    """A held request whose client disconnects stops counting against max_held at once."""
    import socket

    g = make_gate(1, gate="hold_timeout: 30s\nmax_held: 1\n")
    g.view("loading")
    c = socket.create_connection(("127.0.0.1", g.port))
    c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    poll_for(lambda: g.proc.stats.held == 1, 5, "the request held")
    c.close()
    poll_for(lambda: g.proc.stats.held == 0, 5, "the held request dropped")
    assert g.proc.stats.rejected == 0


class Traffic:
    """Clients sending chats in a loop, every outcome kept (status or exception)."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.outcomes: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                status, _, body = call(self.url, "/v1/chat/completions",
                                       {**CHAT, "standin_delay_s": 0.05}, timeout=30)
                self.outcomes.append(str(status) if status == 200 else f"{status} {body!r}")
            except Exception as e:
                self.outcomes.append(f"{type(e).__name__}: {e}")

    def finish(self) -> list[str]:
        self.stop.set()
        for t in self.threads:
            t.join(40)
        return self.outcomes


def test_planned_restart_under_load_costs_no_errors(run_standin: Callable[..., Any],
                                                    make_gate: Callable[..., GateRun]) -> None:
    """A reload with a launch change as the daemon will do it (drain, drained, SIGTERM the
    old vLLM, start the new one, ready) under steady load: zero client errors."""
    s = ready_standin(run_standin)
    g = make_gate(s.port, gate="hold_timeout: 20s\ndrain_timeout: 10s\n")
    g.view("ready", last_load_s=1.0)
    load = Traffic(g.url)
    poll_for(lambda: len(load.outcomes) >= 20, 20, "steady traffic")
    g.proc.drain()
    drained = g.wait_for(GateDrained, 15)
    assert not drained.timed_out
    os.killpg(s.pid, signal.SIGTERM)
    s.proc.wait(10)
    g.view("stopping", last_load_s=1.0, phase_since=time.monotonic())
    s2 = ready_standin(run_standin, port=s.port)
    g.view("ready", last_load_s=1.0)
    n = len(load.outcomes)
    poll_for(lambda: len(load.outcomes) >= n + 20, 20, "traffic through the new vLLM")
    outcomes = load.finish()
    assert [o for o in outcomes if o != "200"] == []
    assert s2.state.state()["counts"].get("POST /v1/chat/completions", 0) >= 20
    print(f"planned restart under load: {len(outcomes)} requests, 0 errors, drain "
          f"{drained.waited_s:.3f}s")


def test_stop_under_load_finishes_in_flight_and_503s_the_rest(
        run_standin: Callable[..., Any], make_gate: Callable[..., GateRun]) -> None:
    """A stop: in-flight requests finish during the drain; once the daemon says no vLLM is
    coming (given_up, phase stopping), new and held requests get a clean 503, not a reset."""
    s = ready_standin(run_standin)
    g = make_gate(s.port, gate="hold_timeout: 20s\n")
    g.view("ready", last_load_s=1.0)
    slow = Background(lambda: call(g.url, "/v1/chat/completions",
                                   {**CHAT, "standin_delay_s": 1.5}))
    poll_for(lambda: g.proc.stats.in_flight == 1, 5, "in flight")
    g.proc.drain()
    poll_for(lambda: g.proc.stats.draining, 5, "draining")
    held = Background(lambda: call(g.url, "/v1/chat/completions", CHAT))
    poll_for(lambda: g.proc.stats.held == 1, 5, "a new request held")
    g.wait_for(GateDrained, 10)
    assert slow.join()[0] == 200
    os.killpg(s.pid, signal.SIGTERM)
    g.view("stopping", ready=False, given_up=True)
    status, headers, body = held.join(5)
    assert status == 503 and "Retry-After" in headers
    assert "the service is stopping" in json.loads(body)["error"]["message"]
    status, _, _ = call(g.url, "/v1/models")
    assert status == 503


def test_embeddings_without_an_embedding_model_are_501(
        run_standin: Callable[..., Any], make_gate: Callable[..., GateRun]) -> None:
    """/api/embed for a model vLLM serves no embeddings for: a clear 501, not a 404."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    status, _, body = call(g.url, "/api/embed", {"model": "nika", "input": "hi"})
    assert status == 501 and "does not serve embeddings" in json.loads(body)["error"]
