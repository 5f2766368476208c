"""Fixtures of the systemd tier: a real systemd 252 as PID 1 of a private namespace.

`host_guard` (session, autouse) snapshots the host before the first namespace boots and checks
after the last one is gone that nothing changed: /etc's user files, unit directories, /opt,
/etc/nika, core files in /, leftover processes and cgroups.

`nika_ns` (session) is one namespace in which scripts/install.sh has installed the package, the
shipped unit, the user and /etc/nika; the nika tests share it and `nika_unit` resets the unit
between them. test_harness.py boots namespaces of its own (it tests boot and teardown).

Needs root, unshare/nsenter and systemd; skipped with the reason otherwise, unless CI is set:
then a missing piece fails the run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.tier import cannot_run

sys.path.insert(0, str(Path(__file__).resolve().parent))

from systemd_harness import (
    Namespace,
    host_snapshot,
    unavailable_reason,
)


def require_systemd_tier() -> None:
    """Skip the case where systemd cannot run here; under CI, fail it (tests/helpers/tier.py)."""
    reason = unavailable_reason()
    if reason is not None:
        cannot_run("the systemd tier", reason)


@pytest.fixture(scope="session", autouse=True)
def host_guard() -> Iterator[None]:
    """The host looks the same after the tier as before it."""
    if unavailable_reason() is not None:
        yield
        return
    before = host_snapshot()
    yield
    after = host_snapshot()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the systemd tier changed the host: {changed}"


@pytest.fixture(scope="session")
def boot_namespace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        list[Namespace]]:
    """Boots namespaces on demand (`boot_namespace` is a list; use `boot(ns_list, name)`),
    and tears every one of them down at the end of the session, failing on leftovers."""
    booted: list[Namespace] = []
    yield booted
    problems = [p for ns in booted for p in ns.teardown()]
    assert not problems, f"teardown problems: {problems}"


@pytest.fixture(scope="session")
def nika_ns(tmp_path_factory: pytest.TempPathFactory,
            boot_namespace: list[Namespace]) -> Namespace:
    """A namespace with nika-supervisor installed by scripts/install.sh (its output is kept
    in install.log next to the namespace's work directory)."""
    require_systemd_tier()
    from nika_helpers import copy_standin, install

    work = tmp_path_factory.mktemp("nika-ns")
    ns = Namespace.boot(work / "ns")
    boot_namespace.append(ns)
    ns.notes["install output"] = install(ns, work / "install.log")
    copy_standin(ns)
    cfg = ns.path("/etc/nika/nika-vllm.yaml")
    st = cfg.stat()
    ns.notes["installed config"] = (cfg.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid)
    return ns


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from systemd_harness import MEASUREMENTS

    if MEASUREMENTS:
        terminalreporter.section("systemd tier measurements")
        for key, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{key}: {value}")
