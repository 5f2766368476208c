"""sd_notify: READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, RELOADING, STOPPING.

With NOTIFY_SOCKET unset (a terminal), every call is a no-op and nothing else changes.
Abstract socket addresses ("@name") are handled by sdnotify. Protocol: sd_notify(3).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import sdnotify


class _Transport(sdnotify.SystemdNotifier):  # type: ignore[misc]
    """sdnotify's sender, pointed at an address we choose (it would read os.environ itself).
    Like sd_notify(3), a failed send is ignored: systemd going away must not kill vLLM."""

    def __init__(self, address: str) -> None:
        self.debug = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect("\0" + address[1:] if address.startswith("@") else address)
        except OSError:
            sock.close()
            self.socket: socket.socket | None = None
        else:
            self.socket = sock


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        self._sd = _Transport(address) if address else None
        self.watchdog_interval = watchdog_interval(env, os.getpid())
        self._last_status: str | None = None

    def send(self, *lines: str) -> None:
        if self._sd is not None:
            # sdnotify encodes latin-1 and would drop a message it cannot encode, silently.
            text = "\n".join(lines).encode("latin-1", "replace").decode("latin-1")
            self._sd.notify(text)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+) match this reload to its request; older
        # versions ignore it. sd_notify(3): "RELOADING=1 ... MONOTONIC_USEC=...".
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when the watchdog is
    off or meant for another process (WATCHDOG_PID set and not ours). sd_watchdog_enabled(3)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid and wpid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
