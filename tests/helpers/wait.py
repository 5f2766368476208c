"""Deadline waits (circus's `poll_for`): never `sleep(n); assert`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_for(predicate: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.02) -> T:
    """Call predicate until it returns something truthy and return that; after timeout
    seconds raise AssertionError naming `what` and the last value (or exception) seen.

    An AssertionError from the predicate ends the wait at once (a condition that can no
    longer become true, e.g. the process being waited on has exited); other exceptions are
    taken as "not yet" (a file half written, a server not listening yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except AssertionError:
            raise
        except Exception as e:  # a predicate may race with a process going away
            value, last = None, e
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                 f"last seen: {last!r}")
        time.sleep(interval)
