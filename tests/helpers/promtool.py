"""Finds promtool (and the Prometheus server) for the tests that check the exposition and
the alert rules with them.

Order: $PROMTOOL, then where scripts/promtool.sh unpacks Debian's package
($NIKA_CACHE/prometheus/usr/bin/promtool; `make promtool`), then PATH. Missing: a skip, but a
failure under CI=true (CI must never pass by skipping).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from helpers.tier import CACHE, cannot_run


def promtool() -> str:
    for candidate in (os.environ.get("PROMTOOL"), str(CACHE / "prometheus/usr/bin/promtool"),
                      shutil.which("promtool")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    cannot_run("promtool checks", "promtool not found: run `make promtool` "
               "(bash scripts/promtool.sh) or set PROMTOOL")


def prometheus() -> str:
    """The Prometheus server from the same package (scripts/promtool.sh unpacks both)."""
    for candidate in (os.environ.get("PROMETHEUS"),
                      str(CACHE / "prometheus/usr/bin/prometheus"), shutil.which("prometheus")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    cannot_run("a real Prometheus server", "prometheus not found: run `make promtool` "
               "(bash scripts/promtool.sh) or set PROMETHEUS")


def run(*args: str, stdin: bytes | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60, cwd=cwd)
