"""Reading and steering a running stand-in server (tests/standin/standin_server.py) through
its state directory and its /_standin/ endpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers.procs import environ_has, pid_alive
from helpers.wait import poll_for


class Standin:
    def __init__(self, state_dir: Path | str, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.dir = Path(state_dir)
        self._port = port
        self.host = host

    # -- files ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any] | None:
        """api.json of the latest start, or None before the first."""
        try:
            data = json.loads((self.dir / "api.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.dir / name).read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def api_pid(self) -> int | None:
        return self._pid("api.pid")

    @property
    def engine_pid(self) -> int | None:
        return self._pid("engine.pid")

    def started(self) -> list[tuple[str, int]]:
        """(role, pid) for every stand-in process ever started with this state dir."""
        try:
            lines = (self.dir / "starts.log").read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            role, _, pid = line.partition(" ")
            if pid.strip().isdigit():
                out.append((role, int(pid)))
        return out

    def api_pids(self) -> list[int]:
        return [p for r, p in self.started() if r == "api"]

    def is_ours(self, pid: int) -> bool:
        """pid is alive and carries this state dir in its environment (not a reused pid)."""
        return pid_alive(pid) and environ_has(pid, "STANDIN_STATE_DIR", str(self.dir))

    def alive(self) -> list[tuple[str, int]]:
        return [(r, p) for r, p in self.started() if self.is_ours(p)]

    def kill_leftovers(self) -> list[tuple[str, int]]:
        """SIGKILL every recorded stand-in process still alive; return what was found."""
        found = self.alive()
        for _role, pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if found:
            poll_for(lambda: not self.alive(), 5.0, "leftover stand-in processes to die")
        return found

    # -- HTTP ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is not None:
            return self._port
        info = self.info()
        assert info is not None, f"no api.json in {self.dir}"
        return int(info["port"])

    def _url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def control(self, **body: Any) -> dict[str, Any]:
        """POST /_standin/engine: frozen, running, waiting, progress, dead, listed, exit..."""
        req = urllib.request.Request(self._url("/_standin/engine"),
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return dict(json.loads(r.read()))
        except OSError:  # URLError, a reset connection
            if "exit" in body:  # the server may be gone before it answers
                return {}
            raise

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self._url("/_standin/state"), timeout=5) as r:
            return dict(json.loads(r.read()))

    def get(self, path: str, timeout: float = 5.0,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self._url(path), headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
