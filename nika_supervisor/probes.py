"""HTTP probes of vLLM's OpenAI server: readiness, liveness, metrics and the canary.

Each probe is a plain function returning an outcome (never raising for network trouble), run
on a worker thread by the supervisor so that a hung server cannot stall the main loop or the
watchdog. Endpoints as served by vLLM's API server (vllm/entrypoints/openai/api_server.py):
`GET /health` answers 200, or 503 once the engine is dead (EngineDeadError);
`GET /v1/models` lists the served model names; `GET /metrics` is Prometheus text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    reason: str = ""
    engine_dead: bool = False
    probe: str = ""


def base_url(host: str, port: int) -> str:
    """Where to probe: a wildcard bind address is probed on loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _describe(e: requests.RequestException, timeout: float) -> str:
    if isinstance(e, requests.Timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(e, requests.ConnectionError):
        return "connection refused" if "refused" in str(e).lower() else "connection failed"
    return type(e).__name__


def models(base: str, alias: str, api_key: str | None, timeout: float) -> Outcome:
    """200 from /v1/models with the alias listed."""
    try:
        r = requests.get(f"{base}/v1/models", headers=_headers(api_key), timeout=timeout)
    except requests.RequestException as e:
        return Outcome(False, _describe(e, timeout), probe="models")
    if r.status_code != 200:
        return Outcome(False, f"/v1/models answered {r.status_code}", probe="models")
    try:
        ids = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError):
        return Outcome(False, "/v1/models answered invalid JSON", probe="models")
    if alias not in ids:
        return Outcome(False, f"alias {alias!r} not listed by /v1/models", probe="models")
    return Outcome(True, probe="models")


def health(base: str, timeout: float) -> Outcome:
    """200 from /health; 503 means vLLM's engine is dead and will not recover."""
    try:
        r = requests.get(f"{base}/health", timeout=timeout)
    except requests.RequestException as e:
        return Outcome(False, _describe(e, timeout), probe="health")
    if r.status_code == 503:
        return Outcome(False, "/health answered 503", engine_dead=True, probe="health")
    if r.status_code != 200:
        return Outcome(False, f"/health answered {r.status_code}", probe="health")
    return Outcome(True, probe="health")


def live(base: str, alias: str, api_key: str | None, timeout: float) -> Outcome:
    """/health, then /v1/models, within one overall deadline of `timeout` seconds."""
    start = time.monotonic()
    h = health(base, timeout)
    if not h.ok:
        return h
    left = timeout - (time.monotonic() - start)
    if left <= 0:
        return Outcome(False, f"no answer within {timeout:g}s", probe="models")
    return models(base, alias, api_key, left)


def metrics_text(base: str, timeout: float) -> str | None:
    try:
        r = requests.get(f"{base}/metrics", timeout=timeout)
    except requests.RequestException:
        return None
    return r.text if r.status_code == 200 else None


@dataclass(frozen=True, slots=True)
class Generation:
    ok: bool
    reason: str = ""
    tokens: int = 0
    seconds: float = 0.0


def complete(base: str, alias: str, api_key: str | None, timeout: float,
             max_tokens: int = 1, prompt: str = "ping") -> Generation:
    """A real completion through the alias: the only probe a frozen engine cannot fake."""
    body = {"model": alias, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if max_tokens > 1:
        body["ignore_eos"] = True  # vLLM extension: time a fixed number of tokens
    start = time.monotonic()
    try:
        r = requests.post(f"{base}/v1/completions", json=body, headers=_headers(api_key),
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
