"""A real sd_notify receiver: an AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET is
(sd_notify(3); python-systemd's tests do the same). A thread records every datagram with its
CLOCK_MONOTONIC arrival time, so tests can assert order and cadence.

`@name` binds an abstract socket (the leading @ becomes a NUL byte, as sd_notify(3) says).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helpers.wait import poll_for


@dataclass(frozen=True, slots=True)
class Message:
    t: float  # time.monotonic() at arrival
    fields: dict[str, str] = field(hash=False)
    raw: bytes = b""

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)


def parse(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\n"):
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


class NotifySocket:
    """Bind, record, and answer questions about what the daemon told "systemd"."""

    def __init__(self, address: str | None = None, directory: str | None = None) -> None:
        self._own_dir: str | None = None
        if address is None:
            # sun_path is 108 bytes: keep it short, whatever pytest's tmp_path is.
            self._own_dir = directory or tempfile.mkdtemp(prefix="nkn-", dir="/tmp")
            address = os.path.join(self._own_dir, "notify.sock")
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self._messages: list[Message] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="notify-reader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                raw = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            msg = Message(time.monotonic(), parse(raw), raw)
            with self._cond:
                self._messages.append(msg)
                self._cond.notify_all()

    # -- queries -------------------------------------------------------------------------

    @property
    def messages(self) -> list[Message]:
        with self._cond:
            return list(self._messages)

    def with_key(self, key: str, since: float | None = None) -> list[Message]:
        return [m for m in self.messages if key in m.fields and (since is None or m.t >= since)]

    def fields(self, key: str) -> list[str]:
        """Every value sent for key, in order."""
        return [m.fields[key] for m in self.messages if key in m.fields]

    def first(self, key: str, value: str | None = None) -> Message | None:
        for m in self.messages:
            if key in m.fields and (value is None or m.fields[key] == value):
                return m
        return None

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float,
                 what: str = "a notify message", since: float | None = None) -> Message:
        """The first message (at or after `since`) whose fields satisfy predicate."""

        def find() -> Message | None:
            for m in self.messages:
                if (since is None or m.t >= since) and predicate(m.fields):
                    return m
            return None

        try:
            return poll_for(find, timeout, what, interval=0.01)
        except AssertionError as e:
            raise AssertionError(f"{e}\nnotify messages so far:\n{self.dump()}") from None

    def wait_key(self, key: str, value: str | None = None, timeout: float = 10.0,
                 since: float | None = None) -> Message:
        what = f"{key}={value}" if value is not None else key
        return self.wait_for(lambda f: key in f and (value is None or f[key] == value),
                             timeout, what, since)

    def dump(self, start: float | None = None) -> str:
        t0 = start if start is not None else (self._messages[0].t if self._messages else 0.0)
        return "\n".join(f"  +{m.t - t0:7.3f}s {m.raw.decode('latin-1')!r}"
                         for m in self.messages) or "  (none)"

    def close(self) -> None:
        self._closed = True
        self._thread.join(1.0)
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.address)
        if self._own_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._own_dir)
