"""sd_notify details on a real socket: the watchdog cadence, WATCHDOG_PID, abstract
addresses, and that systemd's variables stay with the daemon (sd_notify(3),
sd_watchdog_enabled(3))."""

from __future__ import annotations

import itertools
import statistics
import uuid
from pathlib import Path

import pytest
from helpers import NotifySocket, poll_for, write_config

pytestmark = pytest.mark.process


def test_watchdog_pings_at_half_the_period_from_the_start(tmp_path: Path, start_daemon,
                                                          notify_socket) -> None:
    """WATCHDOG_USEC=600000: WATCHDOG=1 about every 0.3 s, already while loading (a slow load
    must not trip the watchdog) and on after READY."""
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_BIND_DELAY_S": "1.0"}})
    start_daemon(cfg, notify=notify_socket, watchdog_usec=600_000)
    ready = notify_socket.wait_key("READY", "1", timeout=15)
    poll_for(lambda: len(notify_socket.with_key("WATCHDOG", since=ready.t)) >= 5, 5,
             "five WATCHDOG=1 after READY")
    pings = [m.t for m in notify_socket.with_key("WATCHDOG")]
    assert all(m.fields["WATCHDOG"] == "1" for m in notify_socket.with_key("WATCHDOG"))
    assert len([t for t in pings if t < ready.t]) >= 2, notify_socket.dump()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.6, f"a gap of {max(gaps):.3f}s would have tripped a 0.6s watchdog"
    assert 0.25 <= statistics.median(gaps) <= 0.35, gaps


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(tmp_path: Path, start_daemon,
                                                                notify_socket) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours: no WATCHDOG=1."""
    cfg = write_config(tmp_path)
    d = start_daemon(cfg, notify=notify_socket, watchdog_usec=400_000, watchdog_pid="1")
    notify_socket.wait_key("READY", "1", timeout=15)
    base = d.standin.state()["counts"].get("GET /health", 0)
    poll_for(lambda: d.standin.state()["counts"].get("GET /health", 0) >= base + 4, 5,
             "four health probes (0.8 s, two watchdog periods)")
    assert not notify_socket.with_key("WATCHDOG")
    assert d.wait_event("supervisor.starting")["watchdog_s"] is None


def test_abstract_notify_socket(tmp_path: Path, start_daemon) -> None:
    """NOTIFY_SOCKET=@name (an abstract socket) receives READY=1 like a path would."""
    sock = NotifySocket(address=f"@nika-test-{uuid.uuid4().hex[:12]}")
    try:
        start_daemon(write_config(tmp_path), notify=sock)
        ready = sock.wait_key("READY", "1", timeout=15)
        assert "nika" in ready.fields["STATUS"]
    finally:
        sock.close()


def test_systemd_variables_are_not_passed_to_vllm(tmp_path: Path, start_daemon,
                                                  notify_socket) -> None:
    """vLLM's environment has no NOTIFY_SOCKET, WATCHDOG_USEC or WATCHDOG_PID (it must not
    talk to systemd as the main process), but has the configured env and unbuffered output."""
    cfg = write_config(tmp_path, vllm={"env": {"EXTRA_FLAG": "on"}})
    d = start_daemon(cfg, notify=notify_socket, watchdog_usec=400_000,
                     env={"NIKA_TEST_PASSTHROUGH": "yes"})
    d.wait_event("vllm.ready", timeout=20)
    info = d.standin.info()
    assert info is not None
    env = info["env"]
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in env, name
    assert env["EXTRA_FLAG"] == "on" and env["NIKA_TEST_PASSTHROUGH"] == "yes"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert info["sid"] == info["pid"] == info["pgid"], "vLLM is not in a session of its own"
