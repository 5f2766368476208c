"""HTTP probes of vLLM's OpenAI server: readiness, liveness, metrics and the canary.

Each probe is a plain function returning an outcome (never raising for network trouble), run
on a worker thread by the supervisor so that a hung server cannot stall the main loop or the
watchdog. Endpoints as served by vLLM's API server (vllm/entrypoints/openai/api_server.py):
`GET /health` answers 200, or 503 once the engine is dead (EngineDeadError);
`GET /v1/models` lists the served model names; `GET /metrics` is Prometheus text.

The GETs that run every health.interval go through one pooled keep-alive urllib3 connection
pool (thread-safe; urllib3 is what requests is built on): on this project's 2-core dev box a
/health + /v1/models pair cost 3.4 ms of CPU through `requests.get` and 1.9 ms through the
pool, which matters against the 0.5 %-of-a-core budget at a 1 s interval. The rare
completions (canary, speed check) use requests. A pooled connection that the server dropped
(restart) is detected by urllib3 before reuse; one that hangs times out like a fresh one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    reason: str = ""
    engine_dead: bool = False
    probe: str = ""


@dataclass(frozen=True)
class Target:
    """Where vLLM answers: a wildcard bind address is probed on loopback."""

    host: str
    port: int
    pool: urllib3.HTTPConnectionPool = field(compare=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def target(host: str, port: int) -> Target:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    pool = urllib3.HTTPConnectionPool(host, port, maxsize=8, block=False, retries=False)
    return Target(host, port, pool)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _describe(e: Exception, timeout: float) -> str:
    if isinstance(e, requests.Timeout | urllib3.exceptions.TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(e, urllib3.exceptions.NewConnectionError | requests.ConnectionError):
        return "connection refused" if "refused" in str(e).lower() else "connection failed"
    if isinstance(e, urllib3.exceptions.ProtocolError):
        return "connection dropped"
    return type(e).__name__


def _get(t: Target, path: str, timeout: float, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes] | str:
    """(status, body), or the reason it failed."""
    try:
        r = t.pool.request("GET", path, headers=headers, timeout=timeout, preload_content=True)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return _describe(e, timeout)
    return r.status, r.data


def models(t: Target, alias: str, api_key: str | None, timeout: float) -> Outcome:
    """200 from /v1/models with the alias listed."""
    got = _get(t, "/v1/models", timeout, _headers(api_key))
    if isinstance(got, str):
        return Outcome(False, got, probe="models")
    status, body = got
    if status != 200:
        return Outcome(False, f"/v1/models answered {status}", probe="models")
    try:
        data: Any = json.loads(body)
        ids = [m.get("id") for m in data.get("data", [])]
    except (ValueError, AttributeError):
        return Outcome(False, "/v1/models answered invalid JSON", probe="models")
    if alias not in ids:
        return Outcome(False, f"alias {alias!r} not listed by /v1/models", probe="models")
    return Outcome(True, probe="models")


def health(t: Target, timeout: float) -> Outcome:
    """200 from /health; 503 means vLLM's engine is dead and will not recover."""
    got = _get(t, "/health", timeout)
    if isinstance(got, str):
        return Outcome(False, got, probe="health")
    status, _ = got
    if status == 503:
        return Outcome(False, "/health answered 503", engine_dead=True, probe="health")
    if status != 200:
        return Outcome(False, f"/health answered {status}", probe="health")
    return Outcome(True, probe="health")


def live(t: Target, alias: str, api_key: str | None, timeout: float) -> Outcome:
    """/health, then /v1/models, within one overall deadline of `timeout` seconds."""
    start = time.monotonic()
    h = health(t, timeout)
    if not h.ok:
        return h
    left = timeout - (time.monotonic() - start)
    if left <= 0:
        return Outcome(False, f"no answer within {timeout:g}s", probe="models")
    return models(t, alias, api_key, left)


def metrics_text(t: Target, timeout: float) -> str | None:
    got = _get(t, "/metrics", timeout)
    if isinstance(got, str) or got[0] != 200:
        return None
    return got[1].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Generation:
    ok: bool
    reason: str = ""
    tokens: int = 0
    seconds: float = 0.0


def complete(t: Target, alias: str, api_key: str | None, timeout: float,
             max_tokens: int = 1, prompt: str = "ping") -> Generation:
    """A real completion through the alias: the only probe a frozen engine cannot fake."""
    body = {"model": alias, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if max_tokens > 1:
        body["ignore_eos"] = True  # vLLM extension: time a fixed number of tokens
    start = time.monotonic()
    try:
        r = requests.post(f"{t.url}/v1/completions", json=body, headers=_headers(api_key),
                          timeout=timeout)
    except requests.RequestException as e:
        return Generation(False, _describe(e, timeout), seconds=time.monotonic() - start)
    took = time.monotonic() - start
    if r.status_code != 200:
        return Generation(False, f"/v1/completions answered {r.status_code}", seconds=took)
    try:
        tokens = int(r.json().get("usage", {}).get("completion_tokens", 0))
    except (ValueError, AttributeError, TypeError):
        return Generation(False, "/v1/completions answered invalid JSON", seconds=took)
    return Generation(True, tokens=tokens, seconds=took)
