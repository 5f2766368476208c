"""Deep liveness, the executor's bookkeeping: which deep check is due for the serving vLLM,
and what each result means.

The rules are pure and live in metrics.py (the stall rule, the canary schedule, the slow-mode
hints). This class keeps their state for one vLLM at a time, says which HTTP work is due, and
turns results into a `Failure` (restart) or log events. It does no I/O: the supervisor runs
the HTTP calls on its probe pool and hands the results back here on the main thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nika_supervisor.config import HealthConfig
from nika_supervisor.metrics import CanaryScheduler, StallRule, VllmMetrics, slow_mode_hints
from nika_supervisor.policy import Failure
from nika_supervisor.probes import Generation

SPEED_TOKENS = 16  # the short generation timed once after READY (slow mode)


@dataclass(frozen=True, slots=True)
class Work:
    """An HTTP call the supervisor should run on its pool for vLLM `pid`."""

    kind: str  # "metrics" | "canary" | "speed"
    pid: int
    max_tokens: int = 0


class DeepChecks:
    def __init__(self, health: HealthConfig, log: Any) -> None:
        self.health = health
        self.log = log
        self.stall = StallRule(health.stall_after)
        self.canary = CanaryScheduler(health.canary_interval)
        self._busy: set[str] = set()
        self._next_metrics = 0.0
        self._speed_checked: int | None = None

    def configure(self, health: HealthConfig) -> None:
        """A reload: new settings, same history."""
        self.health = health
        self.stall.stall_after = health.stall_after
        self.canary.interval = health.canary_interval

    def reset(self) -> None:
        """A new vLLM: the counters of the old one mean nothing."""
        self.stall.reset()
        self.canary.reset()

    def _metrics_wanted(self) -> bool:
        return self.health.stall_after > 0 or self.health.canary_interval > 0

    def deadline(self) -> float | None:
        """When the next /metrics read is due while serving; None while one is in flight or
        none are wanted (a past deadline that nothing acts on would spin the loop)."""
        if "metrics" in self._busy or not self._metrics_wanted():
            return None
        return self._next_metrics

    def due(self, now: float, pid: int) -> list[Work]:
        """Work to start now for the serving vLLM `pid`."""
        out: list[Work] = []
        if self._metrics_wanted() and now >= self._next_metrics and "metrics" not in self._busy:
            self._next_metrics = now + self.health.interval
            out.append(self._start(Work("metrics", pid)))
        if self.health.min_tokens_per_s > 0 and self._speed_checked != pid \
                and "speed" not in self._busy:
            self._speed_checked = pid
            out.append(self._start(Work("speed", pid, SPEED_TOKENS)))
        return out

    def _start(self, work: Work) -> Work:
        self._busy.add(work.kind)
        return work

    def done(self, kind: str) -> None:
        self._busy.discard(kind)

    def on_metrics(self, now: float, pid: int, m: VllmMetrics | None
                   ) -> tuple[Failure | None, Work | None]:
        """A /metrics read came back: a stall (Failure), or a canary to send, or nothing."""
        if m is not None:
            why = self.stall.observe(now, m)
            if why:
                self.log.error("stall.detected", reason=why)
                return Failure(f"engine stalled: {why}",
                               "vLLM's engine makes no progress; see its output",
                               code="stall"), None
        if "canary" not in self._busy and self.canary.due(now, m):
            self.canary.sent(now, m.generation_tokens if m is not None else None)
            return None, self._start(Work("canary", pid, 1))
        return None, None

    def on_generated(self, kind: str, g: Generation, env: Mapping[str, str],
                     args: Mapping[str, object]) -> Failure | None:
        """A canary (a failure restarts vLLM) or the speed check (warn only) came back."""
        if kind == "canary":
            if g.ok:
                self.log.debug("canary.ok", seconds=round(g.seconds, 3))
                return None
            self.log.error("canary.failed", reason=g.reason, seconds=round(g.seconds, 3))
            return Failure(f"canary completion failed: {g.reason}",
                           "/health and /v1/models may still answer while the engine is "
                           "frozen; vLLM is restarted", code="canary")
        if not g.ok or g.seconds <= 0:
            self.log.warning("speed.unmeasured", reason=g.reason)
            return None
        tps = g.tokens / g.seconds
        hints = slow_mode_hints(tps, self.health.min_tokens_per_s, env, args)
        if hints:
            self.log.warning("vllm.slow_mode", tokens_per_s=round(tps, 2),
                             minimum=self.health.min_tokens_per_s, hints=hints)
        else:
            self.log.info("vllm.speed", tokens_per_s=round(tps, 2), tokens=g.tokens)
        return None
