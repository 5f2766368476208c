"""Shared helpers for the GPU tests: a deadline wait, a fake NVML rig, real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import poll_for  # the shared deadline wait (tests/helpers/wait.py)
from helpers.clock import FakeClock
from helpers.fake_nvml import FakeDevice, FakePynvml

from nika_supervisor.config import GpuConfig
from nika_supervisor.gpu import GpuFinding, GpuMonitor, Nvml

__all__ = ["Holders", "Rig", "holders", "poll_for", "rig_factory"]


class Rig:
    """A GpuMonitor over a FakePynvml, a fake clock, and the findings its thread emitted."""

    def __init__(self, gpus: list[FakeDevice] | None = None, meminfo: str | None = None,
                 event_timeout_ms: int = 20, **cfg: Any) -> None:
        self.fake = FakePynvml(gpus)
        self.clock = FakeClock()
        self.emitted: list[GpuFinding] = []
        self.cfg = GpuConfig(**{"nvml": "required", **cfg})
        self.mon = GpuMonitor(self.cfg, {}, self.emitted.append, nvml=Nvml(self.fake),
                              clock=self.clock.now, base_env={}, event_timeout_ms=event_timeout_ms,
                              **({"meminfo_path": meminfo} if meminfo else {}))

    def sample(self, pids: tuple[int, ...] = (), after: float = 0.0) -> Any:
        self.clock.advance(after)
        return self.mon.sample(pids)


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(gpus: list[FakeDevice] | None = None, **kw: Any) -> Rig:
        r = Rig(gpus, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.mon.close()


HOLD = """
import sys, time
f = open(sys.argv[1], "rb") if len(sys.argv) > 1 else None
print("ready", flush=True)
sys.stdin.read()
"""


class Holders:
    """Real child processes that hold a file open (a stand-in for /dev/nvidia0) until ended."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, path: Path | None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        argv = [sys.executable, "-c", HOLD] + ([str(path)] if path else [])
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", f"holder did not start: {line!r}"
        return p

    def end_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the group we created (start_new_session)
            p.wait(timeout=10)


@pytest.fixture
def holders() -> Iterator[Holders]:
    h = Holders()
    yield h
    h.end_all()
