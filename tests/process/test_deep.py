"""Deep liveness against the stand-in: a frozen engine that /health and /v1/models cannot see
is caught by the canary; requests that make no progress are caught by the stall rule; a
saturated server that still makes progress is left alone. Issue 6."""

from __future__ import annotations

import pytest
from helpers import poll_for

pytestmark = pytest.mark.process

FAST_DEEP = {"interval": "0.2s", "timeout": "1s", "failure_threshold": 3,
             "startup_timeout": "20s", "stall_after": 0, "canary_interval": 0,
             "canary_timeout": "1s"}


def metrics_reads(d) -> int:
    return int(d.standin.state()["counts"].get("GET /metrics", 0))


def test_frozen_engine_is_caught_by_the_canary(ready_daemon) -> None:
    """Completions hang while /health and /v1/models answer 200: the canary's deadline fails
    and vLLM is restarted, with the cause in vllm.fault and restart.scheduled."""
    d = ready_daemon(health={**FAST_DEEP, "canary_interval": "1s"})
    old = d.standin.api_pid
    t0 = d.events[-1].t
    d.standin.control(frozen=True)
    failed = d.wait_event("canary.failed", timeout=10, since=t0)
    assert "no answer within 1s" in failed["reason"]
    assert not d.events_named("health.failed", since=t0), "the shallow probes saw it too?"
    fault = d.wait_event("vllm.fault", timeout=5, since=t0)
    assert fault["code"] == "canary"
    sched = d.wait_event("restart.scheduled", timeout=5, since=t0)
    assert "canary completion failed" in sched["reason"]
    d.wait_event("vllm.ready", timeout=15, since=sched.t, pid=lambda p: p != old)


def test_no_canary_while_tokens_flow(ready_daemon) -> None:
    """Progress since the last canary (the token counter moved) means no canary is sent."""
    d = ready_daemon(health={**FAST_DEEP, "canary_interval": "0.6s"})
    d.standin.control(progress=True)
    start = metrics_reads(d)
    poll_for(lambda: metrics_reads(d) >= start + 12, 10, "a dozen /metrics reads")
    counts = d.standin.state()["counts"]
    assert counts.get("POST /v1/completions", 0) == 0, counts


def test_requests_without_progress_are_a_stall(ready_daemon) -> None:
    """Requests running and waiting while generation_tokens_total stays flat for stall_after:
    stall.detected, then a restart."""
    d = ready_daemon(health={**FAST_DEEP, "stall_after": "1s"})
    t0 = d.events[-1].t
    d.standin.control(running=2, waiting=1)
    stall = d.wait_event("stall.detected", timeout=10, since=t0)
    assert "2 running and 1 waiting" in stall["reason"]
    sched = d.wait_event("restart.scheduled", timeout=5, since=t0)
    assert sched["reason"].startswith("engine stalled")


def test_saturated_but_progressing_server_is_not_restarted(ready_daemon) -> None:
    """Requests queue up but tokens keep flowing: slow is not stalled, no restart."""
    d = ready_daemon(health={**FAST_DEEP, "stall_after": "0.6s"})
    t0 = d.events[-1].t
    d.standin.control(running=8, waiting=30, progress=True)
    start = metrics_reads(d)
    # stall_after is three reads long; watch five times as many
    poll_for(lambda: metrics_reads(d) >= start + 15, 10, "fifteen /metrics reads")
    assert not d.events_named("stall.detected", since=t0)
    assert not d.events_named("restart.scheduled", since=t0)


def test_slow_generation_warns_with_likely_causes(ready_daemon) -> None:
    """After READY one short generation is timed; below min_tokens_per_s a warning names
    the likely causes (here TRITON_INTERPRET=1) and vLLM keeps serving."""
    d = ready_daemon(health={**FAST_DEEP, "min_tokens_per_s": 1_000_000},
                     standin_env={"TRITON_INTERPRET": "1"})
    slow = d.wait_event("vllm.slow_mode", timeout=10)
    assert slow["tokens_per_s"] > 0
    assert any("TRITON_INTERPRET=1" in h for h in slow["hints"])
    assert not d.events_named("restart.scheduled")
