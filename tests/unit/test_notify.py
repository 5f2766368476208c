"""sd_notify against a real AF_UNIX datagram socket (python-systemd's approach)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nika_supervisor.notify import Notifier, watchdog_interval


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    s.settimeout(2)
    yield s, path
    s.close()


def recv(s: socket.socket) -> dict[str, str]:
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_messages_reach_the_socket(sock: tuple[socket.socket, str]) -> None:
    """READY, STATUS, EXTEND_TIMEOUT_USEC, RELOADING+MONOTONIC_USEC, STOPPING, WATCHDOG."""
    s, path = sock
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("ready: nika")
    assert recv(s) == {"READY": "1", "STATUS": "ready: nika"}
    n.status("loading")
    assert recv(s) == {"STATUS": "loading"}
    n.extend_timeout(20)
    assert recv(s) == {"EXTEND_TIMEOUT_USEC": "20000000"}
    n.reloading()
    m = recv(s)
    assert m["RELOADING"] == "1" and int(m["MONOTONIC_USEC"]) > 0
    n.stopping("stopping")
    assert recv(s) == {"STOPPING": "1", "STATUS": "stopping"}
    n.watchdog()
    assert recv(s) == {"WATCHDOG": "1"}


def test_unchanged_status_is_not_resent(sock: tuple[socket.socket, str]) -> None:
    """STATUS goes out when it changes, not on every loop pass."""
    s, path = sock
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("a")
    n.status("a")
    n.status("b")
    assert recv(s) == {"STATUS": "a"}
    assert recv(s) == {"STATUS": "b"}


def test_abstract_socket_address() -> None:
    """An '@name' NOTIFY_SOCKET is the abstract namespace."""
    name = f"nika-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("x")
        assert recv(s) == {"READY": "1", "STATUS": "x"}
    finally:
        s.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    """A foreground run in a terminal: disabled, and calls are harmless no-ops."""
    n = Notifier({})
    assert not n.enabled
    n.ready("x")
    n.watchdog()


def test_watchdog_interval_is_half_and_respects_watchdog_pid() -> None:
    """Ping at half of WATCHDOG_USEC, only if WATCHDOG_PID is unset or ours."""
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "5"}, 5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "6"}, 5) is None
    assert watchdog_interval({}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, 5) is None
