"""Deep liveness for the serving vLLM, as pure values: which deep check is due, and what each
result means.

The rules live in metrics.py (the stall rule, the canary schedule, the slow-mode hints). A
`DeepState` keeps their state for one vLLM; the functions here return the next state and what
to do: HTTP work for the executor's pool (`Work`), log events, or a `Failure` (restart). The
policy holds the state in its SERVING record and calls these; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from nika_supervisor.actions import Log, Work, log
from nika_supervisor.config import HealthConfig
from nika_supervisor.failures import Failure
from nika_supervisor.metrics import CanaryScheduler, StallRule, VllmMetrics, slow_mode_hints
from nika_supervisor.probes import Generation

SPEED_TOKENS = 16  # the short generation timed once after READY (slow mode)


@dataclass(frozen=True, slots=True)
class DeepState:
    stall: StallRule
    canary: CanaryScheduler
    busy: frozenset[str] = field(default=frozenset())  # kinds of work in flight
    next_metrics: float = 0.0
    speed_checked: bool = False

    @classmethod
    def fresh(cls, health: HealthConfig) -> DeepState:
        """A new vLLM: the counters of the old one mean nothing."""
        return cls(StallRule(health.stall_after), CanaryScheduler(health.canary_interval))

    def configure(self, health: HealthConfig) -> DeepState:
        """A reload: new settings, same history."""
        return replace(self, stall=replace(self.stall, stall_after=health.stall_after),
                       canary=replace(self.canary, interval=health.canary_interval))

    def done(self, kind: str) -> DeepState:
        return replace(self, busy=self.busy - {kind})


def metrics_wanted(health: HealthConfig) -> bool:
    return health.stall_after > 0 or health.canary_interval > 0


def deadline(d: DeepState, health: HealthConfig) -> float | None:
    """When the next /metrics read is due; None while one is in flight or none are wanted
    (a past deadline that nothing acts on would spin the loop)."""
    if "metrics" in d.busy or not metrics_wanted(health):
        return None
    return d.next_metrics


def due(d: DeepState, health: HealthConfig, now: float, pid: int
        ) -> tuple[DeepState, list[Work]]:
    """Work to start now for the serving vLLM `pid`."""
    out: list[Work] = []
    if metrics_wanted(health) and now >= d.next_metrics and "metrics" not in d.busy:
        d = replace(d, next_metrics=now + health.interval, busy=d.busy | {"metrics"})
        out.append(Work("metrics", pid))
    if health.min_tokens_per_s > 0 and not d.speed_checked and "speed" not in d.busy:
        d = replace(d, speed_checked=True, busy=d.busy | {"speed"})
        out.append(Work("speed", pid, SPEED_TOKENS))
    return d, out


def on_metrics(d: DeepState, now: float, pid: int, m: VllmMetrics | None
               ) -> tuple[DeepState, list[Log], Failure | None, Work | None]:
    """A /metrics read came back: a stall (Failure), or a canary to send, or nothing."""
    d = d.done("metrics")
    if m is not None:
        stall, why = d.stall.observe(now, m)
        d = replace(d, stall=stall)
        if why:
            return d, [log("stall.detected", "error", reason=why)], Failure(
                f"engine stalled: {why}", "vLLM's engine makes no progress; see its output",
                code="stall"), None
    canary, is_due = d.canary.due(now, m)
    d = replace(d, canary=canary)
    if "canary" not in d.busy and is_due:
        canary = d.canary.sent(now, m.generation_tokens if m is not None else None)
        return replace(d, canary=canary, busy=d.busy | {"canary"}), [], None, Work("canary",
                                                                                    pid, 1)
    return d, [], None, None


def on_generated(d: DeepState, health: HealthConfig, kind: str, g: Generation,
                 env: Mapping[str, str], args: Mapping[str, object]
                 ) -> tuple[DeepState, list[Log], Failure | None]:
    """A canary (a failure restarts vLLM) or the speed check (warn only) came back."""
    d = d.done(kind)
    if kind == "canary":
        if g.ok:
            return d, [log("canary.ok", "debug", seconds=round(g.seconds, 3))], None
        return d, [log("canary.failed", "error", reason=g.reason, seconds=round(g.seconds, 3))], \
            Failure(f"canary completion failed: {g.reason}",
                    "/health and /v1/models may still answer while the engine is frozen; "
                    "vLLM is restarted", code="canary")
    if not g.ok or g.seconds <= 0:
        return d, [log("speed.unmeasured", "warning", reason=g.reason)], None
    tps = g.tokens / g.seconds
    hints = slow_mode_hints(tps, health.min_tokens_per_s, env, args)
    if hints:
        return d, [log("vllm.slow_mode", "warning", tokens_per_s=round(tps, 2),
                       minimum=health.min_tokens_per_s, hints=hints)], None
    return d, [log("vllm.speed", tokens_per_s=round(tps, 2), tokens=g.tokens)], None
