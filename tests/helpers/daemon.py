"""Run `python -m nika_supervisor run --config PATH` as a real subprocess and watch it.

The daemon's stdout is read line by line on a thread (so the daemon never blocks on us);
each line is parsed as JSON (`supervisor.log_format: json`) into an `Event` with its
CLOCK_MONOTONIC receive time; other lines are kept too. Teardown ends what the test started,
and reports anything left running: the daemon, its process group, and every stand-in process
recorded in STANDIN_STATE_DIR. Only pids we recorded are ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from helpers.config import REPO, read_config, standin_state_dir
from helpers.notify import NotifySocket
from helpers.procs import group_members, pid_alive
from helpers.standin import Standin
from helpers.wait import poll_for

# The daemon's own systemd variables must come only from the test, never from the host.
_HOST_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
              "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "RUNTIME_DIRECTORY")


@dataclass(frozen=True, slots=True)
class Event:
    t: float  # time.monotonic() when the line was read
    fields: dict[str, Any] = field(hash=False)  # {} for a line that is not a JSON object
    raw: str = ""

    @property
    def name(self) -> str | None:
        value = self.fields.get("event")
        return value if isinstance(value, str) else None

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _matches(ev: Event, name: str | None, matches: dict[str, Any]) -> bool:
    if name is not None and ev.name != name:
        return False
    for key, want in matches.items():
        if key not in ev.fields:
            return False
        have = ev.fields[key]
        if callable(want):
            if not want(have):
                return False
        elif have != want:
            return False
    return True


def _parse(line: str) -> dict[str, Any]:
    text = line
    if text.startswith("<") and text[1:2].isdigit() and text[2:3] == ">":
        text = text[3:]  # sd-daemon priority prefix, should JOURNAL_STREAM match
    if not text.startswith("{"):
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], timeout: float = 30.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m nika_supervisor ARGS...`, captured."""
    return subprocess.run([sys.executable, "-m", "nika_supervisor", *args], cwd=REPO,
                          env=daemon_env(env), capture_output=True, text=True,
                          timeout=timeout, check=False)


class Daemon:
    def __init__(self, config: Path, *, notify: NotifySocket | None = None,
                 watchdog_usec: int | None = None, watchdog_pid: str | None = None,
                 env: dict[str, str] | None = None, command: str = "run") -> None:
        self.config = Path(config)
        self.notify = notify
        extra = dict(env or {})
        if notify is not None:
            extra["NOTIFY_SOCKET"] = notify.address
        if watchdog_usec is not None:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        if watchdog_pid is not None:
            extra["WATCHDOG_PID"] = watchdog_pid
        self.env = daemon_env(extra)
        self.argv = [sys.executable, "-m", "nika_supervisor", command, "--config",
                     str(self.config)]
        cfg = self._cfg()
        self.runtime_dir = Path(cfg.get("supervisor", {}).get("runtime_dir") or "/nonexistent")
        state_dir = standin_state_dir(self.config)
        self.standin = Standin(state_dir or Path("/nonexistent"),
                               port=cfg.get("vllm", {}).get("port"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._events: list[Event] = []
        self._stderr: list[Event] = []
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []

    def _cfg(self) -> dict[str, Any]:
        try:
            return read_config(self.config)
        except Exception:  # an invalid config is a legitimate test input
            return {}

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Daemon:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for pipe, sink in ((self.proc.stdout, self._events), (self.proc.stderr, self._stderr)):
            t = threading.Thread(target=self._read, args=(pipe, sink), daemon=True,
                                 name="daemon-reader")
            t.start()
            self._readers.append(t)
        return self

    def _read(self, pipe: IO[bytes], sink: list[Event]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            ev = Event(time.monotonic(), _parse(line), line)
            with self._cond:
                sink.append(ev)
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit within {timeout:g}s\n"
                                 f"{self.tail()}") from None
        for t in self._readers:
            t.join(2.0)
        return rc

    # -- events --------------------------------------------------------------------------

    @property
    def events(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    @property
    def stderr_lines(self) -> list[str]:
        with self._cond:
            return [e.raw for e in self._stderr]

    def events_named(self, name: str | None, since: float | None = None,
                     **matches: Any) -> list[Event]:
        return [e for e in self.events
                if (since is None or e.t >= since) and _matches(e, name, matches)]

    def wait_event(self, name: str | None, timeout: float = 10.0, since: float | None = None,
                   **matches: Any) -> Event:
        """The first event (at or after `since`) named `name` whose fields equal `matches`
        (a callable match is a predicate on the field's value)."""

        def find() -> Event | None:
            found = self.events_named(name, since, **matches)
            if found:
                return found[0]
            if not self.alive and self.proc is not None:
                for t in self._readers:
                    t.join(0.5)
                found = self.events_named(name, since, **matches)
                if found:
                    return found[0]
                raise _Exited(self.proc.returncode)
            return None

        what = f"event {name} {matches}" if matches else f"event {name}"
        try:
            return poll_for(_reraise_exit(find), timeout, what, interval=0.01)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.tail()}") from None

    def vllm_output(self, stream: str | None = None) -> list[str]:
        """The forwarded lines of vLLM (`vllm.output` events), in order."""
        return [e["line"] for e in self.events_named("vllm.output")
                if stream is None or e.get("stream") == stream]

    def phases(self) -> list[tuple[str, str]]:
        return [(e["from"], e["to"]) for e in self.events_named("phase.changed")]

    def state_file(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.runtime_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def tail(self, n: int = 40) -> str:
        lines = [e.raw for e in self.events if e.name != "vllm.output"][-n:]
        out = "daemon output (last lines, vllm.output left out):\n" + "\n".join(
            f"  {line[:400]}" for line in lines)
        err = self.stderr_lines[-10:]
        if err:
            out += "\ndaemon stderr:\n" + "\n".join(f"  {line[:400]}" for line in err)
        if self.notify is not None:
            out += "\nnotify messages:\n" + self.notify.dump(self.started_at)
        return out

    # -- teardown ------------------------------------------------------------------------

    def close(self, term_timeout: float = 15.0) -> list[str]:
        """End everything this daemon may have left; return a description of each leftover
        (empty when the daemon had cleaned up after itself)."""
        leaks: list[str] = []
        if self.proc is None:
            return leaks
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(term_timeout)
            except subprocess.TimeoutExpired:
                leaks.append(f"daemon pid {self.proc.pid} still running {term_timeout:g}s "
                             "after SIGTERM")
                self.proc.kill()
                self.proc.wait(5)
        members = group_members(self.proc.pid)  # the daemon's own session and group
        if members:
            leaks.append(f"daemon process group {self.proc.pid}: {members}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            poll_for(lambda: not group_members(self.proc.pid), 5,  # type: ignore[union-attr]
                     "the daemon's group to die")
        found = self.standin.kill_leftovers()
        if found:
            leaks.append(f"stand-in processes left running: {found}")
        for t in self._readers:
            t.join(2.0)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return leaks


class _Exited(Exception):
    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"the daemon exited with {returncode}")
        self.returncode = returncode


def _reraise_exit(find: Callable[[], Event | None]) -> Callable[[], Event | None]:
    """poll_for swallows exceptions as 'last seen'; an exited daemon should fail at once."""

    def wrapped() -> Event | None:
        try:
            return find()
        except _Exited as e:
            raise AssertionError(str(e)) from None

    return wrapped


def wait_gone(pids: Sequence[int], timeout: float, what: str) -> None:
    poll_for(lambda: not [p for p in pids if pid_alive(p)], timeout, what)
