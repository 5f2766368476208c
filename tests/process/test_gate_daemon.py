"""The daemon with its gate on, against the stand-in vLLM, through the official `openai` and
`ollama` clients: the public port never refuses a connection across a vLLM crash, requests
made during the restart are held and answered, a reload that restarts vLLM under steady load
costs no request, and a stop lets the request in flight finish first."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import ollama
import openai
import pytest
from helpers import ConnectProbe, Daemon, free_port, poll_for, rewrite_config, run_cli

pytestmark = pytest.mark.process


def gated(ready_daemon: Callable[..., Daemon], **overrides: Any) -> tuple[Daemon, int]:
    port = free_port()
    gate = {"listen": [f"127.0.0.1:{port}"], "hold_timeout": "15s", "drain_timeout": "10s",
            **overrides.pop("gate", {})}
    return ready_daemon(gate=gate, **overrides), port


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                         max_retries=0, timeout=30)


def test_crash_restart_never_refuses_and_holds_requests(ready_daemon) -> None:
    """SIGKILL of vLLM: while it restarts, connects to the public port all succeed and a
    completion sent meanwhile is held, then answered by the new vLLM."""
    d, port = gated(ready_daemon, vllm={"env": {"STANDIN_BIND_DELAY_S": "1.5"}})
    info = d.standin.info()
    assert info is not None
    probe = ConnectProbe(port)
    probe.start()
    t0 = time.monotonic()
    signal_pid = info["pid"]
    os.kill(signal_pid, signal.SIGKILL)
    d.wait_event("vllm.exited", pid=signal_pid, since=t0)
    answer = client(port).completions.create(model="nika", prompt="hi", max_tokens=3)
    took = time.monotonic() - t0
    probe.done.set()
    probe.join(5)
    assert answer.choices[0].text
    new = d.wait_event("vllm.ready", since=t0)
    assert new["pid"] != signal_pid and took >= 1.0  # it waited for the new vLLM
    assert probe.connects > 50 and probe.refused == 0


def test_reload_with_launch_change_under_load_costs_no_request(ready_daemon, tmp_path) -> None:
    """Four clients in a loop; SIGHUP with a new vllm.args: the gate drains the old vLLM,
    holds new requests through the restart, and no request fails."""
    d, port = gated(ready_daemon)
    oai = client(port)
    errors: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        while not done.is_set():
            try:
                r = oai.completions.create(model="nika", prompt="x", max_tokens=2,
                                           extra_body={"standin_delay_s": 0.1})
                assert r.choices[0].text
                count[0] += 1
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    poll_for(lambda: count[0] >= 10, 10, "the load to run")
    rewrite_config(tmp_path / "nika-vllm.yaml", vllm={"args": {"max-model-len": 1024}})
    t0 = time.monotonic()
    before = count[0]
    d.send_signal(signal.SIGHUP)
    ready = d.wait_event("vllm.ready", since=t0, timeout=30)
    after_ready = time.monotonic()
    while count[0] < before + 20 and time.monotonic() < after_ready + 10:
        done.wait(0.05)
    done.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert count[0] >= before + 20
    drained = d.wait_event("gate.drained", since=t0)
    assert drained["timed_out"] is False
    term = d.wait_event("vllm.signal", since=t0, signal="SIGTERM")
    assert drained.t <= term.t  # drained first, then signalled
    assert ready["pid"] != d.events_named("vllm.spawned")[0]["pid"]


def test_stop_lets_the_request_in_flight_finish(ready_daemon) -> None:
    """SIGTERM during a 2 s completion: it is answered in full; then vLLM is stopped."""
    d, port = gated(ready_daemon)
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            result["r"] = client(port).completions.create(
                model="nika", prompt="x", max_tokens=3, extra_body={"standin_delay_s": 2.0})
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=slow)
    t.start()
    poll_for(lambda: d.standin.state()["counts"].get("POST /v1/completions"), 5,
             "the slow completion to reach vLLM")
    d.send_signal(signal.SIGTERM)
    t.join(20)
    assert "error" not in result, result
    assert result["r"].choices[0].text
    assert d.wait_exit(20) == 0
    drained = d.wait_event("gate.drained")
    assert drained["in_flight_left"] == 0 and drained["timed_out"] is False


def test_ollama_client_through_the_daemon(ready_daemon) -> None:
    """An application written for Ollama works unchanged against the daemon's gate."""
    d, port = gated(ready_daemon)
    c = ollama.Client(host=f"http://127.0.0.1:{port}")
    reply = c.chat(model="nika", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content
    assert [m.model for m in c.ps().models] == ["nika:latest"]  # loaded: vLLM is ready
    # `nika-supervisor status` shows the gate's counters
    status = poll_for(lambda: (out := run_cli(["status", "--config", str(d.config)]).stdout)
                      and "gate: 0 in flight, 0 held, 0 rejected" in out and out, 10,
                      "the gate's counters in `status`")
    assert status.splitlines()[0].startswith("ready:")


def test_gate_metrics_answer_while_vllm_is_down(ready_daemon) -> None:
    """The gate's /metrics is the daemon's scrape target: nika_* always (parsed by
    prometheus_client), vLLM's own series appended while vLLM answers, and 200 while vLLM is
    down after a crash."""
    from prometheus_client.parser import text_string_to_metric_families

    d, port = gated(ready_daemon, vllm={"env": {"STANDIN_BIND_DELAY_S": "3"}})

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            text = r.read().decode()
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        return {s.name: s.value for s in samples if not s.labels or s.name.startswith("vllm:")}

    up = poll_for(lambda: (m := scrape()).get("nika_ready") == 1.0 and m, 10, "nika_ready 1")
    assert "vllm:num_requests_running" in up
    info = d.standin.info()
    assert info is not None
    os.kill(info["pid"], signal.SIGKILL)
    down = poll_for(lambda: (m := scrape()).get("nika_ready") == 0.0 and m, 10, "nika_ready 0")
    assert "vllm:num_requests_running" not in down and down["nika_vllm_metrics_up"] == 0.0
