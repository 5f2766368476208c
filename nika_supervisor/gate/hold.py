"""Admission: who may go to vLLM now, who waits, and who gets a 503.

`Admission` runs on the gate's event loop. A request is admitted when the daemon's view says
ready and no drain is on; otherwise it is held (up to `hold_timeout`, at most `max_held` at a
time) and let through the moment a ready view arrives. The clock is injected, and
`retry_after` and the error bodies are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nika_supervisor.gate.protocol import GateStats, UpstreamView

RETRY_GRACE_S = 0.5  # after vLLM failed a request, wait this long for news from the daemon
RETRY_AFTER_MAX_S = 600


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # hold_timeout | max_held | given_up | upstream_failed | not_ready
    phase: str
    cause: str | None
    retry_after: int
    held_s: float
    detail: str | None = None

    def message(self, hold_timeout: float) -> str:
        if self.reason == "given_up" and self.phase in ("stopping", "stopped"):
            return (f"the model is not available: the service is stopping; phase: "
                    f"{self.phase}; retry after {self.retry_after}s")
        why = {
            "hold_timeout": f"it did not become ready within hold_timeout ({hold_timeout:g}s)",
            "max_held": "too many requests are already waiting for it (gate.max_held)",
            "given_up": "the supervisor has given up restarting it",
            "upstream_failed": "it failed this request twice",
            "not_ready": "it is not ready",
        }[self.reason]
        cause = f"; cause: {self.cause}" if self.cause else ""
        detail = f" ({self.detail})" if self.detail else ""
        return (f"the model is not available: {why}{detail}; phase: {self.phase}{cause}; "
                f"retry after {self.retry_after}s")


def retry_after(view: UpstreamView | None, now: float, hold_timeout: float) -> int:
    """Seconds a client should wait: what is left of a load as long as the last one, or a
    whole load when none is under way, or hold_timeout when no load was ever measured."""
    if view is None or view.last_load_s is None:
        estimate = hold_timeout
    elif view.phase in ("starting", "loading") and view.phase_since is not None:
        estimate = view.last_load_s - (now - view.phase_since)
    else:
        estimate = view.last_load_s
    return int(min(max(math.ceil(estimate), 1), RETRY_AFTER_MAX_S))


def openai_error(rej: Rejection, hold_timeout: float) -> dict[str, Any]:
    """OpenAI's error shape (what the SDKs parse), naming the phase and the cause."""
    return {"error": {"message": rej.message(hold_timeout), "type": "service_unavailable",
                      "param": None, "code": 503, "reason": rej.reason, "phase": rej.phase,
                      "cause": rej.cause, "retry_after": rej.retry_after}}


def ollama_error(rej: Rejection, hold_timeout: float) -> dict[str, Any]:
    """Ollama's error shape: one string."""
    return {"error": rej.message(hold_timeout)}


class Admission:
    def __init__(self, hold_timeout: float, max_held: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_timeout = hold_timeout
        self.max_held = max_held
        self.clock = clock
        self.view: UpstreamView | None = None
        self.seq = 0  # views received
        self.draining = False
        self.stats = GateStats()
        self._counts = {"in_flight": 0, "held": 0, "served": 0, "rejected": 0, "retried": 0,
                        "broken_streams": 0}
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_change: Callable[[], None] = lambda: None

    # -- the daemon's side -------------------------------------------------------------------

    def set_view(self, view: UpstreamView) -> None:
        self.view = view
        self.seq += 1
        if self.draining and not view.ready:
            self.draining = False  # the drained vLLM is going away; holding takes over
        self._wake()

    def start_drain(self) -> None:
        self.draining = True
        self._wake()

    def resume(self) -> None:
        self.draining = False
        self._wake()

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is in flight (at once or within timeout)."""
        if timeout <= 0:
            return self._counts["in_flight"] == 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._counts["in_flight"] == 0

    # -- the requests' side ------------------------------------------------------------------

    def admitted(self) -> bool:
        v = self.view
        return v is not None and v.ready and not v.given_up and not self.draining

    def deadline(self) -> float:
        return self.clock() + self.hold_timeout

    async def wait(self, deadline: float, after_seq: int | None = None) -> Rejection | None:
        """Return None once the request may go to vLLM, else why not. after_seq: vLLM just
        failed this request; give the daemon RETRY_GRACE_S to publish what it saw first."""
        start = self.clock()
        if after_seq is not None:
            grace = min(start + RETRY_GRACE_S, deadline)
            while self.seq == after_seq and self.clock() < grace:
                await self._changed_within(grace - self.clock())
        if self.admitted():
            return None
        if self.view is not None and self.view.given_up:
            return self._reject("given_up", start)
        if self._counts["held"] >= self.max_held:
            return self._reject("max_held", start)
        self._bump("held", 1)
        try:
            while not self.admitted():
                if self.view is not None and self.view.given_up:
                    return self._reject("given_up", start)
                left = deadline - self.clock()
                if left <= 0:
                    return self._reject("hold_timeout", start)
                await self._changed_within(left)
            return None
        finally:
            self._bump("held", -1)

    def reject_failed(self, start: float, detail: str) -> Rejection:
        return self._reject("upstream_failed", start, detail)

    def reject_now(self) -> Rejection:
        """For routes that never wait (/health, /metrics): not ready means 503 now."""
        return self._reject("not_ready", self.clock())

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        self._bump("in_flight", 1)
        self._idle.clear()
        try:
            yield
        finally:
            self._bump("in_flight", -1)
            if self._counts["in_flight"] == 0:
                self._idle.set()

    def count(self, what: str) -> None:
        self._bump(what, 1)

    # -- internals ---------------------------------------------------------------------------

    def _reject(self, reason: str, start: float, detail: str | None = None) -> Rejection:
        self._bump("rejected", 1)
        now = self.clock()
        v = self.view
        return Rejection(reason, v.phase if v else "starting", v.cause if v else None,
                         retry_after(v, now, self.hold_timeout), now - start, detail)

    async def _changed_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(seconds, 0.0))

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._publish()

    def _bump(self, what: str, delta: int) -> None:
        self._counts[what] += delta
        self._publish()

    def _publish(self) -> None:
        self.stats = GateStats(draining=self.draining, views=self.seq, **self._counts)
        self.on_change()
