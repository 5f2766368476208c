"""metrics.py: /metrics parsing, the stall rule, the canary schedule, slow-mode hints."""

from __future__ import annotations

from nika_supervisor.metrics import (
    CanaryScheduler,
    StallRule,
    VllmMetrics,
    parse_metrics,
    slow_mode_hints,
)

# The shape of vLLM 0.32's exposition (prometheus_client; labels model_name and engine,
# vllm/v1/metrics/loggers.py), with two engines (data parallel) to show the summing.
SCRAPE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="nika"} 3.0
vllm:num_requests_running{engine="1",model_name="nika"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="nika"} 1.0
vllm:num_requests_waiting{engine="1",model_name="nika"} 0.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="nika"} 1200.0
vllm:generation_tokens_total{engine="1",model_name="nika"} 34.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="nika"} 1.7647e+09
vllm:num_requests_running_not_this{engine="0"} 99.0
process_resident_memory_bytes 1.2e+09
"""


def m(running: float = 0, waiting: float = 0, tokens: float | None = 0) -> VllmMetrics:
    return VllmMetrics(running, waiting, tokens)


def test_parse_sums_label_sets() -> None:
    """Gauges and the counter are summed over engines; other series are ignored."""
    assert parse_metrics(SCRAPE) == VllmMetrics(5.0, 1.0, 1234.0)


def test_parse_missing_metrics() -> None:
    """Absent gauges read 0; an absent counter reads None (progress unknown)."""
    assert parse_metrics("# nothing here\nprocess_cpu_seconds_total 3\n") == \
        VllmMetrics(0.0, 0.0, None)


def test_parse_tricky_labels_timestamps_and_nan() -> None:
    """Label values with braces and spaces, a trailing timestamp, NaN and junk lines."""
    text = ('vllm:num_requests_running{model_name="a } b",engine="0"} 2 1700000000000\n'
            'vllm:num_requests_waiting{model_name="x\\"y"} NaN\n'
            "vllm:generation_tokens_total 7e2\n"
            "vllm:generation_tokens_total{broken 5\n")
    assert parse_metrics(text) == VllmMetrics(2.0, 0.0, 700.0)


class StallRun:
    """Threads the frozen StallRule through a scripted series of reads."""

    def __init__(self, stall_after: float) -> None:
        self.rule = StallRule(stall_after)

    def observe(self, now: float, mm: VllmMetrics) -> str | None:
        self.rule, why = self.rule.observe(now, mm)
        return why


class CanaryRun:
    """Threads the frozen CanaryScheduler through a scripted series of reads."""

    def __init__(self, interval: float) -> None:
        self.sched = CanaryScheduler(interval)

    def due(self, now: float, mm: VllmMetrics | None) -> bool:
        self.sched, due = self.sched.due(now, mm)
        return due

    def sent(self, now: float, tokens: float | None) -> None:
        self.sched = self.sched.sent(now, tokens)


def test_stall_when_busy_and_flat() -> None:
    """Requests running, counter flat for stall_after: a reason naming the figures."""
    rule = StallRun(120)
    assert rule.observe(0, m(2, 1, 500)) is None
    assert rule.observe(119, m(2, 1, 500)) is None
    reason = rule.observe(120, m(2, 1, 500))
    assert reason == ("2 running and 1 waiting requests, but generation_tokens_total stayed "
                      "at 500 for 120s (health.stall_after 120s)")


def test_saturated_but_slow_server_is_never_stalled() -> None:
    """Under load every token counts: 1 token per 100 s for an hour, stall_after 120 s,
    64 requests queued the whole time, and never a stall."""
    rule = StallRun(120)
    tokens = 0
    for t in range(0, 3600, 5):
        if t % 100 == 0:
            tokens += 1
        assert rule.observe(t, m(8, 56, tokens)) is None, t


def test_idle_server_is_never_stalled() -> None:
    """Nothing running or waiting: a flat counter is idleness, not a stall."""
    rule = StallRun(120)
    for t in range(0, 7200, 30):
        assert rule.observe(t, m(0, 0, 42)) is None


def test_stall_clock_starts_when_requests_arrive() -> None:
    """An idle hour then a stuck request: the stall is counted from the request, not the
    hour before."""
    rule = StallRun(120)
    for t in range(0, 3600, 60):
        rule.observe(t, m(0, 0, 42))
    assert rule.observe(3600, m(1, 0, 42)) is None
    assert rule.observe(3719, m(1, 0, 42)) is None
    assert rule.observe(3720, m(1, 0, 42)) is not None


def test_progress_after_a_stall_clears_it() -> None:
    """Once the counter moves the rule is quiet again."""
    rule = StallRun(10)
    rule.observe(0, m(1, 0, 5))
    assert rule.observe(10, m(1, 0, 5)) is not None
    assert rule.observe(11, m(1, 0, 6)) is None
    assert rule.observe(20, m(1, 0, 6)) is None


def test_stall_rule_off_and_unknown_counter() -> None:
    """stall_after 0 turns the rule off; without the counter nothing can be judged."""
    off = StallRun(0)
    assert all(off.observe(t, m(5, 5, 1)) is None for t in range(0, 1000, 10))
    rule = StallRun(10)
    assert all(rule.observe(t, m(5, 5, None)) is None for t in range(0, 1000, 10))


def test_frozen_engine_is_invisible_to_the_stall_rule_but_not_to_the_canary() -> None:
    """The issue's SIGSTOPped engine: /metrics shows 0 running, 0 waiting and a flat
    counter. The stall rule stays quiet; the canary becomes due after its interval."""
    frozen = m(0, 0, 1000)
    rule, canary = StallRun(120), CanaryRun(300)
    due_at = None
    for t in range(0, 1000, 5):
        assert rule.observe(t, frozen) is None
        if canary.due(t, frozen):
            due_at = t
            break
    assert due_at == 300


def test_no_canary_while_traffic_makes_progress() -> None:
    """Steady generation keeps moving the counter: no canary is ever due."""
    canary = CanaryRun(300)
    assert not any(canary.due(t, m(4, 0, t * 10)) for t in range(0, 3600, 5))


def test_canary_due_interval_after_progress_stops() -> None:
    """Traffic until t=1000, then a freeze: the canary is due at t=1300."""
    canary = CanaryRun(300)
    due = [t for t in range(0, 2000, 5)
           if canary.due(t, m(1, 0, min(t, 1000)))]
    assert due[0] == 1300


def test_sent_canary_restarts_the_interval() -> None:
    """After a canary at t=300, the next is due at t=600, the canary's own token (seen as
    progress) moving that to one interval after it was observed."""
    canary = CanaryRun(300)
    canary.due(0, m(tokens=50))
    assert canary.due(300, m(tokens=50))
    canary.sent(300, 50)
    assert not canary.due(301, m(tokens=50))
    assert not canary.due(599, m(tokens=50))
    assert canary.due(600, m(tokens=50))
    canary.sent(600, 50)
    assert not canary.due(605, m(tokens=51))  # the canary's token
    assert not canary.due(900, m(tokens=51))
    assert canary.due(905, m(tokens=51))


def test_canary_without_metrics_and_off() -> None:
    """/metrics unreadable: the canary goes by time alone; interval 0: never."""
    canary = CanaryRun(60)
    assert not canary.due(0, None)
    assert canary.due(60, None)
    off = CanaryRun(0)
    assert not any(off.due(t, None) for t in range(0, 10_000, 100))


def _hints(tps: float, minimum: float = 10.0, env: dict[str, str] | None = None,
           args: dict[str, object] | None = None, files: tuple[str, ...] = ()) -> list[str]:
    return slow_mode_hints(tps, minimum, env or {}, args or {},
                           exists=lambda p: p in files)


CUDA = {"CUDA_HOME": "/usr/local/cuda-13.0",
        "TRITON_PTXAS_PATH": "/usr/local/cuda-13.0/bin/ptxas"}
TOOLS = ("/usr/local/cuda-13.0/bin/ptxas", "/usr/local/cuda-13.0/bin/nvcc")


def test_fast_enough_or_off_gives_no_hints() -> None:
    """At or above the minimum, or with the check off (0), nothing to say."""
    assert _hints(10.0, env={"TRITON_INTERPRET": "1"}) == []
    assert _hints(0.5, minimum=0, env={"TRITON_INTERPRET": "1"}) == []


def test_triton_interpreter_is_the_first_suspect() -> None:
    """The seed's 1 token/s case: TRITON_INTERPRET=1 is named first."""
    hints = _hints(1.0, env={**CUDA, "TRITON_INTERPRET": "1"}, files=TOOLS)
    assert len(hints) == 1 and hints[0].startswith("TRITON_INTERPRET=1")


def test_missing_ptxas_and_nvcc_are_named() -> None:
    """No ptxas/nvcc to be found: both named, with the keys to set."""
    hints = _hints(1.0, env={})
    assert any("no ptxas found" in h for h in hints)
    assert any("no nvcc" in h for h in hints)
    bad = _hints(1.0, env={**CUDA, "TRITON_PTXAS_PATH": "/nope/ptxas"}, files=TOOLS)
    assert bad == ["TRITON_PTXAS_PATH=/nope/ptxas does not exist: point it at CUDA 13's "
                   "bin/ptxas"]


def test_enforce_eager_is_named() -> None:
    """enforce-eager (as vllm.args has it, or with underscores) is a suspect."""
    for args in ({"enforce-eager": True}, {"enforce_eager": "true"}):
        hints = _hints(3.0, env=CUDA, args=args, files=TOOLS)
        assert len(hints) == 1 and "enforce-eager" in hints[0]
    assert "enforce-eager" not in " ".join(
        _hints(3.0, env=CUDA, args={"enforce-eager": False}, files=TOOLS))


def test_no_known_cause_still_says_where_to_look() -> None:
    """A clean configuration that is slow points at clocks and other GPU load."""
    hints = _hints(3.0, env=CUDA, files=TOOLS)
    assert len(hints) == 1 and "nvidia-smi" in hints[0]
