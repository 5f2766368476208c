"""A clock the tests move by hand: the decision core and the GPU monitor take `now` from an
injected clock, so time-based decisions are tested without sleeping."""

from __future__ import annotations


class FakeClock:
    """A clock the tests move by hand (satisfies nika_supervisor.clock.Clock)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t
