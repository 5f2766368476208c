"""The daemon's side of the gate: bind the public sockets once, run the gate as a child
process that inherits them, feed it the upstream view, respawn it if it dies.

About 420 lines, one piece: the sockets, the child's life (spawn, ping, respawn) and the
control channel share one lock and one view of the child, so they stay together.

Why a child process (docs/ARCHITECTURE.md, "The gate"): heavy streaming is CPU work (parsing,
copying, TLS-less but still per-chunk syscalls) that, in the daemon's own interpreter, would
compete for the GIL with the loop that feeds systemd's watchdog. A child has its own
interpreter. The daemon binds and listens once, at start, and keeps the descriptors for its
whole life: while a crashed gate is being respawned, the kernel keeps accepting connections
into the backlog, so a client never sees ECONNREFUSED, only a short wait.

Threads here (none of them blocks the supervisor's loop): one waiter per gate process (exit
-> respawn), one reader (gate -> daemon lines), one writer (daemon -> gate lines, queued, so
that a gate that stops reading can never block `publish`), and a pinger: a gate whose event
loop does not answer a ping for UNRESPONSIVE_AFTER_S is wedged, and is killed and respawned
like a crashed one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

from nika_supervisor.config import Config
from nika_supervisor.gate.protocol import (
    GateSettings,
    GateStats,
    LineBuffer,
    ProtocolError,
    UpstreamView,
    decode,
    encode,
    stats_from,
)
from nika_supervisor.log import get_logger

SUPERVISOR_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES")
BACKLOG = 4096  # capped by net.core.somaxconn; connects wait here while the gate respawns
RESPAWN_FIRST_S = 0.05
RESPAWN_MAX_S = 5.0
RESPAWN_RESET_AFTER_S = 30.0  # a gate that lived this long starts the backoff over
PING_EVERY_S = 2.0
UNRESPONSIVE_AFTER_S = 15.0  # no pong for this long: the gate is wedged; SIGKILL, respawn


@dataclass(frozen=True, slots=True)
class GateStarted:
    pid: int
    listen: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GateDrained:
    in_flight_left: int
    waited_s: float
    timed_out: bool


@dataclass(frozen=True, slots=True)
class GateExited:
    pid: int
    returncode: int | None
    signal: int | None
    respawn_in_s: float | None  # None: not respawned (the gate is being closed)


GateEvent = GateStarted | GateDrained | GateExited


class GateBindError(OSError):
    """A public address could not be bound (in use, not ours, no such interface)."""


def settings_for(cfg: Config, metrics_url: str | None = None) -> GateSettings:
    assert cfg.gate is not None, "settings_for needs a config with a gate section"
    max_len = dict(cfg.vllm.args).get("max-model-len")
    return GateSettings(
        hold_timeout=cfg.gate.hold_timeout, max_held=cfg.gate.max_held,
        drain_timeout=cfg.gate.drain_timeout, ollama=cfg.gate.ollama,
        aliases=cfg.vllm.served_model_name or (cfg.vllm.model,), model=cfg.vllm.model,
        max_model_len=max_len if isinstance(max_len, int) and not isinstance(max_len, bool)
        else None,
        api_key_file=cfg.vllm.api_key_file, metrics_url=metrics_url,
        log_format=_child_format(cfg.supervisor.log_format),
        log_level=cfg.supervisor.log_level)


def _child_format(fmt: str) -> str:
    # "auto" resolves against the daemon's stdout; the child shares it, so resolve it here.
    if fmt != "auto":
        return fmt
    return "console" if sys.stdout.isatty() else "keyvalue"


def _add(base: GateStats, current: GateStats) -> GateStats:
    return GateStats(in_flight=current.in_flight, held=current.held,
                     served=base.served + current.served,
                     rejected=base.rejected + current.rejected,
                     retried=base.retried + current.retried,
                     broken_streams=base.broken_streams + current.broken_streams,
                     draining=current.draining, views=current.views)


def upstream_of(cfg: Config) -> str:
    """vLLM's address as the gate (and the probes) reach it: a wildcard host is loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(
        cfg.vllm.host, cfg.vllm.host)
    return f"[{host}]:{cfg.vllm.port}" if ":" in host else f"{host}:{cfg.vllm.port}"


def bind(addresses: tuple[tuple[str, int], ...]) -> list[socket.socket]:
    """Bind and listen on every public address, or raise GateBindError (nothing left open)."""
    out: list[socket.socket] = []
    try:
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise GateBindError(e.errno, f"cannot bind {host}:{port}: {e.strerror}"
                                    ) from None
            s.listen(BACKLOG)
            s.set_inheritable(True)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


class _Channel:
    """One gate process's control socket: a writer thread and a reader thread."""

    def __init__(self, sock: socket.socket, on_message: Callable[[dict[str, object]], None],
                 on_malformed: Callable[[str], None]) -> None:
        self.sock = sock
        self.out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._on_message = on_message
        self._on_malformed = on_malformed
        threading.Thread(target=self._write, name="gate-ctl-w", daemon=True).start()
        threading.Thread(target=self._read, name="gate-ctl-r", daemon=True).start()

    def send(self, line: bytes) -> None:
        self.out.put(line)

    def close(self) -> None:
        self.out.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _write(self) -> None:
        while (line := self.out.get()) is not None:
            try:
                self.sock.sendall(line)
            except OSError:
                return  # the gate is gone; the waiter respawns it with a new channel
        with contextlib.suppress(OSError):
            self.sock.close()

    def _read(self) -> None:
        lines = LineBuffer()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            got, dropped = lines.feed(data)
            if dropped:
                self._on_malformed(f"{dropped} line(s) over {lines.limit} bytes dropped")
            for line in got:
                try:
                    self._on_message(decode(line))
                except ProtocolError as e:
                    self._on_malformed(str(e))


class GateProcess:
    """The gate as the supervisor sees it. Thread-safe; nothing here blocks for long.

        gate = GateProcess(cfg, emit=inbox.put)
        gate.bind()                 # at start, before anything else can take the port
        gate.start()                # spawn the gate; it answers (holding) from now on
        gate.publish(view)          # on every phase change
        gate.drain()                # before a planned restart/stop; GateDrained arrives
        gate.update(new_cfg)        # on a reload (listen changes need a daemon restart)
        gate.stats                  # latest GateStats, for STATUS
        gate.close()                # at exit, after vLLM is stopped
    """

    def __init__(self, cfg: Config, *, emit: Callable[[GateEvent], None] = lambda e: None,
                 python: str | None = None, environ: Mapping[str, str] | None = None,
                 stdout: IO[bytes] | None = None, metrics_url: str | None = None,
                 unresponsive_after: float = UNRESPONSIVE_AFTER_S) -> None:
        assert cfg.gate is not None, "GateProcess needs a config with a gate section"
        self.cfg = cfg
        self.metrics_url = metrics_url
        self.settings = settings_for(cfg, metrics_url)
        self.emit = emit
        self.python = python or sys.executable
        self.stdout = stdout  # None: the daemon's own (journald); tests pass a file
        base = dict(os.environ if environ is None else environ)
        self.env = {k: v for k, v in base.items() if k not in SUPERVISOR_ONLY_ENV}
        self.log = get_logger()
        self.sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: _Channel | None = None
        self._view: UpstreamView | None = None
        self._drain_timeout: float | None = None  # a drain not yet reported
        self._stats = GateStats()  # since the daemon started, across respawns
        self._base = GateStats()  # what gates that have exited had counted
        self._last = GateStats()  # the current gate's own latest counters
        self._closing = threading.Event()
        self._backoff = RESPAWN_FIRST_S
        self.spawns = 0
        self.unresponsive_after = unresponsive_after
        self._ping_every = min(PING_EVERY_S, unresponsive_after / 4)
        self._pong_at = time.monotonic()

    # -- the interface -------------------------------------------------------------------------

    def bind(self) -> None:
        assert self.cfg.gate is not None
        self.sockets = bind(self.cfg.gate.listen)
        self.log.info("gate.bound", listen=[f"{h}:{p}" for h, p in self.cfg.gate.listen])

    def start(self) -> None:
        assert self.sockets, "bind() first"
        self._spawn()
        threading.Thread(target=self._ping, name="gate-ping", daemon=True).start()

    def publish(self, view: UpstreamView) -> None:
        with self._lock:
            self._view = view
            if self._chan is not None:
                self._chan.send(view.to_line())

    def drain(self, timeout: float | None = None) -> None:
        """Stop admitting to the current vLLM; a GateDrained event follows when nothing is in
        flight, or after timeout (default gate.drain_timeout)."""
        assert self.cfg.gate is not None
        t = self.cfg.gate.drain_timeout if timeout is None else timeout
        with self._lock:
            self._drain_timeout = t
            if self._chan is not None:
                self._chan.send(encode({"type": "drain", "timeout": t}))

    def resume(self) -> None:
        """Cancel a drain (the planned restart is not going to happen)."""
        with self._lock:
            self._drain_timeout = None
            if self._chan is not None:
                self._chan.send(encode({"type": "resume"}))

    def update(self, cfg: Config) -> bool:
        """A reload. False when the listen addresses changed: that needs a daemon restart
        (the sockets are bound once); everything else applies at once."""
        assert cfg.gate is not None and self.cfg.gate is not None
        same = cfg.gate.listen == self.cfg.gate.listen
        self.cfg = cfg
        self.settings = settings_for(cfg, self.metrics_url)
        with self._lock:
            if self._chan is not None:
                self._chan.send(self.settings.to_line())
        return same

    @property
    def stats(self) -> GateStats:
        """served, rejected, retried, broken_streams: since the daemon started (across gate
        respawns); in_flight, held, draining, views: the current gate's."""
        return self._stats

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def close(self, timeout: float = 5.0) -> None:
        """End the gate (SIGTERM, then SIGKILL after timeout) and close the sockets."""
        self._closing.set()
        with self._lock:
            proc, chan = self._proc, self._chan
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if chan is not None:
            chan.close()
        for s in self.sockets:
            s.close()
        self.sockets = []
        self.log.info("gate.closed")

    # -- internals -----------------------------------------------------------------------------

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(s.fileno() for s in self.sockets)]
        argv = [self.python, "-m", "nika_supervisor.gate", "--control-fd", str(fds[0]),
                *(a for fd in fds[1:] for a in ("--listen-fd", str(fd)))]
        theirs.set_inheritable(True)
        try:
            proc = subprocess.Popen(argv, env=self.env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                    stdout=self.stdout, stderr=self.stdout,
                                    start_new_session=True)
        finally:
            theirs.close()
        self.spawns += 1
        gen = self.spawns
        chan = _Channel(ours, lambda msg: self._message(msg, gen), self._malformed)
        with self._lock:
            self._proc, self._chan = proc, chan
            self._pong_at = time.monotonic()  # a fresh gate gets the whole grace period
            # the counters since the daemon started: what the earlier gates counted, plus
            # this one's
            self._base = _add(self._base, self._last)
            self._last = GateStats()
            self._stats = self._base
            chan.send(self.settings.to_line())
            if self._view is not None:
                chan.send(self._view.to_line())
            if self._drain_timeout is not None:
                chan.send(encode({"type": "drain", "timeout": self._drain_timeout}))
        self.log.info("gate.spawned", pid=proc.pid, spawns=self.spawns)
        threading.Thread(target=self._wait, args=(proc, chan, time.monotonic()),
                         name="gate-wait", daemon=True).start()

    def _wait(self, proc: subprocess.Popen[bytes], chan: _Channel, started: float) -> None:
        rc = proc.wait()
        chan.close()
        if self._closing.is_set():
            self.emit(GateExited(proc.pid, rc if rc >= 0 else None,
                                 -rc if rc < 0 else None, None))
            return
        if time.monotonic() - started >= RESPAWN_RESET_AFTER_S:
            self._backoff = RESPAWN_FIRST_S
        delay = self._backoff
        self._backoff = min(self._backoff * 2, RESPAWN_MAX_S)
        self.log.warning("gate.exited", pid=proc.pid, returncode=rc if rc >= 0 else None,
                         signal=signal.Signals(-rc).name if rc < 0 else None,
                         respawn_in_s=delay)
        self.emit(GateExited(proc.pid, rc if rc >= 0 else None, -rc if rc < 0 else None,
                             delay))
        if self._closing.wait(delay):
            return
        try:
            self._spawn()
        except OSError as e:
            self.log.error("gate.spawn_failed", error=str(e))

    def _ping(self) -> None:
        n = 0
        while not self._closing.wait(self._ping_every):
            with self._lock:
                proc, chan = self._proc, self._chan
                silent = time.monotonic() - self._pong_at
            if proc is None or chan is None or proc.poll() is not None:
                continue
            if silent > self.unresponsive_after:
                self.log.error("gate.unresponsive", pid=proc.pid, silent_s=round(silent, 1))
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # the waiter sees the exit and respawns
                with self._lock:
                    self._pong_at = time.monotonic()
                continue
            n += 1
            chan.send(encode({"type": "ping", "n": n}))

    def _message(self, msg: dict[str, object], gen: int) -> None:
        kind = msg["type"]
        if gen != self.spawns:
            return  # a late line from a gate that has been replaced
        if kind == "pong":
            with self._lock:
                self._pong_at = time.monotonic()
        elif kind == "stats":
            with self._lock:
                self._last = stats_from(msg)
                self._stats = _add(self._base, self._last)
        elif kind == "drained":
            with self._lock:
                self._drain_timeout = None
            left, waited, timed_out = (msg.get("in_flight_left"), msg.get("waited_s"),
                                       msg.get("timed_out"))
            if not (isinstance(left, int) and isinstance(waited, int | float)
                    and isinstance(timed_out, bool)):
                raise ProtocolError(f"drained: unexpected fields {msg!r}"[:200])
            self.emit(GateDrained(left, float(waited), timed_out))
        elif kind == "hello":
            pid, listen = msg.get("pid"), msg.get("listen")
            self.emit(GateStarted(pid if isinstance(pid, int) else -1,
                                  tuple(str(x) for x in listen) if isinstance(listen, list)
                                  else ()))
        else:
            raise ProtocolError(f"{kind} is not a message for the daemon")

    def _malformed(self, error: str) -> None:
        self.log.warning("gate.control_malformed", side="daemon", error=error)
