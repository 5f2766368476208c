"""Fixtures of the gate tier: a gate process in front of a stand-in vLLM, the test playing
the daemon (publishing views, asking for drains)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gatehelp import GateRun


@pytest.fixture
def make_gate(tmp_path: Path) -> Iterator[Callable[..., GateRun]]:
    """make_gate(upstream_port, gate="yaml lines", vllm="yaml lines") -> a started GateRun."""
    runs: list[GateRun] = []

    def make(upstream_port: int, **kw: Any) -> GateRun:
        g = GateRun(tmp_path, upstream_port, **kw)
        runs.append(g)
        return g.start()

    yield make
    for g in runs:
        g.close()
