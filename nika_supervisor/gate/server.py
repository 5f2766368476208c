"""The gate process: `python -m nika_supervisor.gate --control-fd N --listen-fd M ...`.

It serves the listening sockets it inherited from the daemon (never binds anything itself)
and talks to the daemon over the control socket (protocol.py). When the control socket
closes, the daemon is gone and so is the point of the gate: it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from typing import Any

from aiohttp import web

from nika_supervisor.gate.app import GateApp
from nika_supervisor.gate.hold import Admission
from nika_supervisor.gate.protocol import (
    GateSettings,
    LineBuffer,
    ProtocolError,
    decode,
    encode,
    settings_from,
    view_from,
)
from nika_supervisor.log import configure, get_logger

STATS_EVERY_S = 0.2


class GateServer:
    def __init__(self, control: socket.socket, listeners: list[socket.socket]) -> None:
        self.control = control
        self.listeners = listeners
        self.log = get_logger()
        self.app: GateApp | None = None
        self.adm: Admission | None = None
        self.runner: web.AppRunner | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stopped = asyncio.Event()
        self._stats_dirty = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        reader, self.writer = await asyncio.open_unix_connection(sock=self.control)
        tasks = [asyncio.create_task(self._read(reader)), asyncio.create_task(self._stats())]
        await self.stopped.wait()
        for t in tasks:
            t.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    # -- the control channel -----------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(obj))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        lines = LineBuffer()
        while True:
            data = await reader.read(65536)
            if not data:
                self.log.info("gate.control_closed", pid=os.getpid())
                self.stopped.set()
                return
            got, dropped = lines.feed(data)
            if dropped:
                self.log.warning("gate.control_malformed", side="gate",
                                 error=f"{dropped} line(s) over {lines.limit} bytes dropped")
            for line in got:
                try:
                    await self._handle(decode(line))
                except ProtocolError as e:
                    self.log.warning("gate.control_malformed", side="gate", error=str(e))

    async def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "settings":
            await self._settings(settings_from(msg))
        elif kind == "ping":
            self.send({"type": "pong", "n": msg.get("n")})
        elif self.adm is None:
            raise ProtocolError(f"{kind} before settings")
        elif kind == "view":
            view = view_from(msg)
            old = self.adm.view
            self.adm.set_view(view)
            if old is None or (old.phase, old.ready) != (view.phase, view.ready):
                self.log.info("gate.upstream", phase=view.phase, ready=view.ready,
                              upstream=view.upstream, cause=view.cause,
                              given_up=view.given_up or None)
        elif kind == "drain":
            timeout = msg.get("timeout")
            if not isinstance(timeout, int | float) or isinstance(timeout, bool):
                raise ProtocolError(f"drain.timeout: unexpected {timeout!r}")
            if self._drain_task is None or self._drain_task.done():
                self._drain_task = asyncio.create_task(self._drain(float(timeout)))
        elif kind == "resume":
            if self.adm.draining:
                self.log.info("gate.drain_resumed")
            self.adm.resume()
        else:
            raise ProtocolError(f"{kind} is not a message for the gate")

    async def _settings(self, s: GateSettings) -> None:
        if self.app is not None:
            self.app.update(s)
            return
        configure(s.log_format, s.log_level)
        self.log = get_logger()
        self.adm = Admission(s.hold_timeout, s.max_held)
        self.adm.on_change = self._stats_dirty.set
        self.app = GateApp(s, self.adm)
        self.runner = web.AppRunner(self.app.build(), handler_cancellation=True,
                                    access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        for sock in self.listeners:
            await web.SockSite(self.runner, sock).start()
        names = [_name(s) for s in self.listeners]
        self.log.info("gate.started", pid=os.getpid(), listen=names, ollama=s.ollama,
                      hold_timeout_s=s.hold_timeout, max_held=s.max_held)
        self.send({"type": "hello", "pid": os.getpid(), "listen": names})

    async def _drain(self, timeout: float) -> None:
        assert self.adm is not None
        start = time.monotonic()
        self.adm.start_drain()
        self.log.info("gate.drain_started", in_flight=self.adm.stats.in_flight,
                      timeout_s=timeout)
        idle = await self.adm.wait_idle(timeout)
        left = self.adm.stats.in_flight
        waited = round(time.monotonic() - start, 3)
        self.log.log(20 if idle else 30, "gate.drained", in_flight_left=left, waited_s=waited,
                     timed_out=not idle)
        self.send({"type": "drained", "in_flight_left": left, "waited_s": waited,
                   "timed_out": not idle})
        self._stats_dirty.set()

    async def _stats(self) -> None:
        while True:
            await self._stats_dirty.wait()
            self._stats_dirty.clear()
            if (self.adm is not None and self.writer is not None
                    and not self.writer.is_closing()):
                self.writer.write(self.adm.stats.to_line())
            await asyncio.sleep(STATS_EVERY_S)


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nika-supervisor-gate")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--listen-fd", type=int, action="append", default=[])
    args = p.parse_args(argv)
    configure("keyvalue", "info")  # until the settings name the daemon's format
    control = socket.socket(fileno=args.control_fd)
    listeners = [socket.socket(fileno=fd) for fd in args.listen_fd]
    for s in listeners:
        s.setblocking(False)
    asyncio.run(GateServer(control, listeners).run())
    return 0
