"""A connect probe: does a public port ever refuse a connection while something restarts?"""

from __future__ import annotations

import errno
import socket
import threading


class ConnectProbe(threading.Thread):
    """Connects to host:port every `every` seconds until stopped, counting the connects that
    succeed, those refused (ECONNREFUSED: nothing listening) and any other failure."""

    def __init__(self, port: int, host: str = "127.0.0.1", every: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.every = host, port, every
        self.connects = self.refused = 0
        self.other: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((self.host, self.port))
                self.connects += 1
            except OSError as e:
                if e.errno == errno.ECONNREFUSED:
                    self.refused += 1
                else:
                    self.other.append(f"{type(e).__name__}: {e}")
            finally:
                s.close()
            self.done.wait(self.every)

    def stop(self) -> ConnectProbe:
        self.done.set()
        self.join(5)
        return self

    def __enter__(self) -> ConnectProbe:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
