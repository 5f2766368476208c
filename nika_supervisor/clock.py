"""Time as the decision core sees it: a monotonic number of seconds, passed in. (The tests'
hand-moved clock is tests/helpers/clock.py.)"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    """The executor's clock. Monotonic, so wall-clock jumps (NTP, suspend) cannot fire deadlines."""

    def now(self) -> float:
        return time.monotonic()

