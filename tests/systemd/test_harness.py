"""The harness itself: a private systemd boots, runs a Type=notify unit with journald and the
watchdog, and goes away without touching the host. A unit written inline keeps these checks
independent of nika-supervisor."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_systemd_tier
from helpers import poll_for
from systemd_harness import Namespace, host_snapshot

pytestmark = pytest.mark.systemd

# Sends READY=1, a warning and an info line (sd-daemon prefixes), then WATCHDOG=1 every 0.2 s
# until /run/pinger/stop exists.
PINGER = r"""
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect("\0" + addr[1:] if addr.startswith("@") else addr)
s.send(b"READY=1\nSTATUS=pinging")
print("<4>pinger warning line", flush=True)
print("<6>pinger info line", flush=True)
while not os.path.exists("/run/pinger/stop"):
    s.send(b"WATCHDOG=1")
    time.sleep(0.2)
print("<4>pinger stopped pinging", flush=True)
while True:
    time.sleep(60)
"""
PINGER_UNIT = """\
[Unit]
Description=harness self-test: Type=notify with a watchdog
[Service]
Type=notify
ExecStart=/usr/bin/python3 /opt/harness/pinger.py
WatchdogSec=2s
Restart=on-failure
RestartSec=1s
"""


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    require_systemd_tier()
    ns = Namespace.boot(tmp_path_factory.mktemp("harness") / "ns")
    try:
        yield ns
    finally:
        problems = ns.teardown()
        assert not problems, problems


def test_boots_with_only_our_units(ns: Namespace) -> None:
    """systemd runs as PID 1 of the namespace, reaches running, and has loaded none of the
    host's services (no SysV units such as dbus or postgresql)."""
    assert ns.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    state = ns.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state == "running", ns.systemctl("--failed", check=False).stdout
    units = ns.systemctl("list-units", "--all", "--plain", "--no-legend").stdout
    for name in ("postgresql", "dbus", "getty", "cron", "ssh"):
        assert name not in units, f"{name} was loaded:\n{units}"
    assert ns.pid in ns.cgroup_pids("init.scope"), \
        f"systemd must manage the test's own cgroup subtree {ns.cgroup}"


def test_notify_watchdog_journald(ns: Namespace) -> None:
    """A Type=notify unit becomes active on READY=1, its <N> prefixes become journal
    priorities, and when it stops pinging the watchdog kills it (SIGABRT, no core file in /)
    and Restart= starts it again."""
    ns.write("/opt/harness/pinger.py", PINGER)
    ns.write("/etc/systemd/system/pinger.service", PINGER_UNIT)
    ns.systemctl("daemon-reload")
    ns.systemctl("start", "pinger.service")
    assert ns.show("pinger.service", "ActiveState")["ActiveState"] == "active"
    assert "Status: \"pinging\"" in ns.systemctl("status", "pinger.service", check=False).stdout

    warnings = ns.journal("-u", "pinger.service", "-p", "warning", "-o", "cat")
    assert "pinger warning line" in warnings
    assert "pinger info line" not in warnings
    assert "pinger info line" in ns.journal("-u", "pinger.service", "-o", "cat")

    first = ns.show("pinger.service", "MainPID")["MainPID"]
    t0 = time.monotonic()
    ns.run(["mkdir", "-p", "/run/pinger"])
    ns.run(["touch", "/run/pinger/stop"])
    poll_for(lambda: "Watchdog timeout" in ns.journal("-u", "pinger.service"), 2 + 3,
             "systemd's watchdog timeout message")
    detected = time.monotonic() - t0
    ns.run(["rm", "/run/pinger/stop"])
    poll_for(lambda: ns.show("pinger.service", "NRestarts", "ActiveState", "MainPID") in
             ({"NRestarts": "1", "ActiveState": "active", "MainPID": p}
              for p in [ns.show("pinger.service", "MainPID")["MainPID"]] if p != first),
             10, "the unit restarted by Restart= after the watchdog")
    assert detected < 2 + 2, f"watchdog took {detected:.1f}s for WatchdogSec=2s"
    journal = ns.journal("-u", "pinger.service")
    assert "SIGABRT" in journal or "ABRT" in journal, journal
    assert not [n for n in os.listdir("/") if n.startswith("core")], "a core file landed in /"
    ns.systemctl("stop", "pinger.service")


def test_teardown_leaves_host_untouched(tmp_path: Path) -> None:
    """A namespace that installed a user, a unit and files in /etc and /opt, and ran a
    service, is gone after teardown: no process, no cgroup, and the host unchanged."""
    require_systemd_tier()
    before = host_snapshot()
    ns = Namespace.boot(tmp_path / "ns")
    try:
        ns.run(["useradd", "--system", "--no-create-home", "nika-harness-probe"])
        ns.write("/etc/nika/probe.yaml", "probe: 1\n")
        ns.write("/opt/harness/probe", "probe\n")
        ns.write("/etc/systemd/system/sleeper.service",
                 "[Service]\nExecStart=/bin/sleep 300\n")
        ns.systemctl("daemon-reload")
        ns.systemctl("start", "sleeper.service")
        sleeper = ns.host_pid(int(ns.show("sleeper.service", "MainPID")["MainPID"]))
        assert sleeper in ns.unit_pids("sleeper.service")
        assert "nika-harness-probe" in ns.run(["getent", "passwd", "nika-harness-probe"]).stdout
        assert not Path("/etc/nika/probe.yaml").exists()
    finally:
        problems = ns.teardown()
    assert not problems, problems
    assert not os.path.exists(f"/proc/{sleeper}"), "the namespace's service survived teardown"
    assert not ns.cgroup.exists(), f"{ns.cgroup} survived teardown"
    after = host_snapshot()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, changed
