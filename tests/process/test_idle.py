"""The main loop sleeps between deadlines: no busy-wait in any steady phase. A guard against
a deadline in the past that nothing acts on (which once spun the loop at 90 % of a core with
the deep checks off). The threshold is generous on purpose: the real figure is in
docs/BENCHMARKS.md; this only catches a spinning loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import poll_for

pytestmark = pytest.mark.process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health_hits(d) -> int:
    return int(d.standin.state()["counts"].get("GET /health", 0))


@pytest.mark.parametrize("deep", [False, True], ids=["deep-checks-off", "deep-checks-on"])
def test_ready_daemon_does_not_spin(ready_daemon, deep: bool) -> None:
    """While READY, over 15 probe intervals the daemon uses well under half a core."""
    health = {"interval": "0.2s", "timeout": "1s", "failure_threshold": 3,
              "startup_timeout": "20s", "stall_after": "10s" if deep else 0,
              "canary_interval": "10s" if deep else 0}
    d = ready_daemon(health=health)
    start_hits, c0, t0 = health_hits(d), cpu_seconds(d.pid), time.monotonic()
    poll_for(lambda: health_hits(d) >= start_hits + 15, 15, "15 more /health probes")
    used, wall = cpu_seconds(d.pid) - c0, time.monotonic() - t0
    assert used < 0.5 * wall, f"the daemon used {used:.2f}s of CPU in {wall:.2f}s"
