"""Deep-check bookkeeping with an injected clock: what is due, and what results mean."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from nika_supervisor.config import HealthConfig
from nika_supervisor.deep import DeepChecks, Work
from nika_supervisor.metrics import VllmMetrics
from nika_supervisor.probes import Generation


def checks(**kw: float) -> DeepChecks:
    return DeepChecks(HealthConfig(interval=5.0, **kw), structlog.get_logger())


def test_nothing_due_and_no_deadline_when_off() -> None:
    """With stall_after, canary_interval and min_tokens_per_s all 0, no work and no deadline."""
    d = checks(stall_after=0, canary_interval=0, min_tokens_per_s=0)
    assert d.due(100.0, 7) == [] and d.deadline() is None


def test_metrics_every_interval_one_at_a_time() -> None:
    """One /metrics read per interval, never two in flight; no deadline while one is."""
    d = checks(stall_after=120, canary_interval=0)
    assert d.due(100.0, 7) == [Work("metrics", 7)]
    assert d.deadline() is None and d.due(200.0, 7) == []
    d.done("metrics")
    assert d.deadline() == 105.0
    assert d.due(104.0, 7) == [] and d.due(105.0, 7) == [Work("metrics", 7)]


def test_speed_is_timed_once_per_vllm() -> None:
    """The slow-mode generation runs once for each new vLLM pid."""
    d = checks(stall_after=0, canary_interval=0, min_tokens_per_s=5)
    assert d.due(1.0, 7) == [Work("speed", 7, 16)]
    d.done("speed")
    assert d.due(2.0, 7) == []
    assert d.due(3.0, 8) == [Work("speed", 8, 16)]


def test_flat_counter_with_queued_requests_is_a_stall() -> None:
    """Requests waiting and tokens flat for stall_after: a Failure with code stall."""
    d = checks(stall_after=10, canary_interval=0)
    busy = VllmMetrics(running=1, waiting=2, generation_tokens=50)
    with capture_logs() as logs:
        assert d.on_metrics(0.0, 7, busy) == (None, None)
        assert d.on_metrics(5.0, 7, busy) == (None, None)
        failure, canary = d.on_metrics(10.0, 7, busy)
    assert failure is not None and failure.code == "stall" and canary is None
    assert [e["event"] for e in logs] == ["stall.detected"]


def test_canary_when_quiet_and_its_failure_restarts() -> None:
    """No progress for canary_interval: a 1-token canary; its failure is a Failure."""
    d = checks(stall_after=0, canary_interval=30)
    idle = VllmMetrics(running=0, waiting=0, generation_tokens=50)
    assert d.on_metrics(0.0, 7, idle) == (None, None)
    assert d.on_metrics(29.0, 7, idle) == (None, None)
    assert d.on_metrics(30.0, 7, idle) == (None, Work("canary", 7, 1))
    assert d.on_metrics(31.0, 7, idle) == (None, None)  # one in flight
    with capture_logs() as logs:
        f = d.on_generated("canary", Generation(False, "no answer within 30s"), {}, {})
    assert f is not None and f.code == "canary" and "no answer within 30s" in f.cause
    assert logs[0]["event"] == "canary.failed"
    assert d.on_generated("canary", Generation(True, tokens=1, seconds=0.1), {}, {}) is None


def test_slow_generation_warns_and_never_restarts() -> None:
    """Below min_tokens_per_s: vllm.slow_mode with hints, no Failure."""
    d = checks(min_tokens_per_s=10)
    with capture_logs() as logs:
        f = d.on_generated("speed", Generation(True, tokens=16, seconds=16.0),
                           {"TRITON_INTERPRET": "1"}, {})
    assert f is None
    assert logs[0]["event"] == "vllm.slow_mode" and logs[0]["tokens_per_s"] == 1.0
    assert any("TRITON_INTERPRET=1" in h for h in logs[0]["hints"])
