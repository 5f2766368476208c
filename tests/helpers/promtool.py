"""Finds promtool for the tests that check exposition and alert rules with it.

Order: $PROMTOOL, then where scripts/promtool.sh unpacks Debian's package
($NIKA_CACHE/prometheus/usr/bin/promtool; `make promtool`), then PATH. Missing: a skip, but a
failure under CI=true (CI must never pass by skipping).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def promtool() -> str:
    cache = Path(os.environ.get("NIKA_CACHE", Path.home() / ".cache" / "nika-supervisor"))
    for candidate in (os.environ.get("PROMTOOL"), str(cache / "prometheus/usr/bin/promtool"),
                      shutil.which("promtool")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    msg = "promtool not found: run `make promtool` (bash scripts/promtool.sh) or set PROMTOOL"
    if _ci():
        pytest.fail(f"CI is set and {msg}", pytrace=False)
    pytest.skip(msg)


def run(*args: str, stdin: bytes | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60, cwd=cwd)
