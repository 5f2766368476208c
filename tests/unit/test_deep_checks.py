"""Deep checks as pure values, with the time passed in: what is due, what results mean."""

from __future__ import annotations

from nika_supervisor import deep
from nika_supervisor.actions import Work
from nika_supervisor.config import HealthConfig
from nika_supervisor.deep import DeepState
from nika_supervisor.metrics import VllmMetrics
from nika_supervisor.probes import Generation


def health(**kw: float) -> HealthConfig:
    return HealthConfig(interval=5.0, **kw)


def test_nothing_due_and_no_deadline_when_off() -> None:
    """With stall_after, canary_interval and min_tokens_per_s all 0, no work and no deadline."""
    h = health(stall_after=0, canary_interval=0, min_tokens_per_s=0)
    d = DeepState.fresh(h)
    assert deep.due(d, h, 100.0, 7) == (d, []) and deep.deadline(d, h) is None


def test_metrics_every_interval_one_at_a_time() -> None:
    """One /metrics read per interval, never two in flight; no deadline while one is."""
    h = health(stall_after=120, canary_interval=0)
    d, work = deep.due(DeepState.fresh(h), h, 100.0, 7)
    assert work == [Work("metrics", 7)]
    assert deep.deadline(d, h) is None and deep.due(d, h, 200.0, 7)[1] == []
    d = d.done("metrics")
    assert deep.deadline(d, h) == 105.0
    assert deep.due(d, h, 104.0, 7)[1] == [] and deep.due(d, h, 105.0, 7)[1] == [
        Work("metrics", 7)]


def test_speed_is_timed_once_per_vllm() -> None:
    """The slow-mode generation runs once for each vLLM (each gets a fresh DeepState)."""
    h = health(stall_after=0, canary_interval=0, min_tokens_per_s=5)
    d, work = deep.due(DeepState.fresh(h), h, 1.0, 7)
    assert work == [Work("speed", 7, 16)]
    assert deep.due(d.done("speed"), h, 2.0, 7)[1] == []
    assert deep.due(DeepState.fresh(h), h, 3.0, 8)[1] == [Work("speed", 8, 16)]


def test_flat_counter_with_queued_requests_is_a_stall() -> None:
    """Requests waiting and tokens flat for stall_after: a Failure with code stall."""
    h = health(stall_after=10, canary_interval=0)
    d = DeepState.fresh(h)
    busy = VllmMetrics(running=1, waiting=2, generation_tokens=50)
    d, logs, failure, canary = deep.on_metrics(d, 0.0, 7, busy)
    assert (logs, failure, canary) == ([], None, None)
    d, logs, failure, canary = deep.on_metrics(d, 5.0, 7, busy)
    assert (logs, failure, canary) == ([], None, None)
    d, logs, failure, canary = deep.on_metrics(d, 10.0, 7, busy)
    assert failure is not None and failure.code == "stall" and canary is None
    assert [entry.event for entry in logs] == ["stall.detected"]


def test_canary_when_quiet_and_its_failure_restarts() -> None:
    """No progress for canary_interval: a 1-token canary; its failure is a Failure."""
    h = health(stall_after=0, canary_interval=30)
    d = DeepState.fresh(h)
    idle = VllmMetrics(running=0, waiting=0, generation_tokens=50)
    d, _, _, canary = deep.on_metrics(d, 0.0, 7, idle)
    assert canary is None
    d, _, _, canary = deep.on_metrics(d, 29.0, 7, idle)
    assert canary is None
    d, _, _, canary = deep.on_metrics(d, 30.0, 7, idle)
    assert canary == Work("canary", 7, 1)
    d, _, _, canary = deep.on_metrics(d, 31.0, 7, idle)
    assert canary is None  # one in flight
    d2, logs, f = deep.on_generated(d, h, "canary", Generation(False, "no answer within 30s"),
                                    {}, {})
    assert f is not None and f.code == "canary" and "no answer within 30s" in f.cause
    assert logs[0].event == "canary.failed" and "canary" not in d2.busy
    assert deep.on_generated(d, h, "canary", Generation(True, tokens=1, seconds=0.1),
                             {}, {})[2] is None


def test_slow_generation_warns_and_never_restarts() -> None:
    """Below min_tokens_per_s: vllm.slow_mode with hints, no Failure."""
    h = health(min_tokens_per_s=10)
    _, logs, f = deep.on_generated(DeepState.fresh(h), h, "speed",
                                   Generation(True, tokens=16, seconds=16.0),
                                   {"TRITON_INTERPRET": "1"}, {})
    assert f is None
    fields = logs[0].as_dict()
    assert logs[0].event == "vllm.slow_mode" and fields["tokens_per_s"] == 1.0
    hints = fields["hints"]
    assert isinstance(hints, list) and any("TRITON_INTERPRET=1" in h for h in hints)


def test_reload_keeps_the_history_with_new_settings() -> None:
    """configure() changes the thresholds and keeps what was observed."""
    h = health(stall_after=10, canary_interval=30)
    d, *_ = deep.on_metrics(DeepState.fresh(h), 0.0, 7, VllmMetrics(1, 0, 50))
    d2 = d.configure(health(stall_after=99, canary_interval=7))
    assert d2.stall.stall_after == 99 and d2.canary.interval == 7
    assert d2.stall.tokens == d.stall.tokens == 50
