"""One vLLM process group: spawn it, forward its output, report its exit, signal the group.

vLLM forks an EngineCore and Workers. It is started in a session of its own (honcho's
`start_new_session=True`), so its pid is its process group id and every descendant that
does not call setsid itself can be signalled at once with killpg (Supervisor's killasgroup).

Output forwarding never blocks vLLM: reader threads drain the pipes into a bounded queue and
a writer thread renders it. If the writer falls behind (a stuck journald), lines are dropped
and counted rather than letting the pipe fill and vLLM stall on write().
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from typing import IO

from nika_supervisor.command import LaunchSpec
from nika_supervisor.errors import SpawnError

OUTPUT_QUEUE_LINES = 200_000  # about 40 MB of typical log lines at most
MAX_LINE_BYTES = 16_384  # a longer line is cut: a binary blob must not balloon memory

LineSink = Callable[[list[tuple[str, str]]], None]  # a batch of (stream, line)
LineTap = Callable[[str], None]  # sees every line, on the reader thread (diagnosis)
ExitCallback = Callable[[int, int | None, int | None], None]  # pid, returncode, signal


class OutputPump:
    """Reader threads per stream -> bounded queue -> one writer thread."""

    def __init__(self, sink: LineSink, tap: LineTap | None = None,
                 capacity: int = OUTPUT_QUEUE_LINES) -> None:
        self._sink = sink
        self._tap = tap
        self._q: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=capacity)
        self._readers: list[threading.Thread] = []
        self._writer = threading.Thread(target=self._write_loop, name="vllm-output-writer",
                                        daemon=True)
        self.dropped = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._waiting: dict[str, bool] = {}
        self._closed: set[str] = set()
        self._chunks = 0

    def start(self, streams: dict[str, IO[bytes]]) -> None:
        self.pipes = dict(streams)
        for name, pipe in streams.items():
            self._waiting[name] = False
            t = threading.Thread(target=self._read_loop, args=(name, pipe),
                                 name=f"vllm-{name}-reader", daemon=True)
            self._readers.append(t)
            t.start()
        self._writer.start()

    def _read_loop(self, stream: str, pipe: IO[bytes]) -> None:
        # Raw os.read + our own line splitting: fewer syscalls than readline, and "blocked in
        # read with nothing in the pipe" then really means every line was handed on (drained).
        fd = pipe.fileno()
        buf = b""
        try:
            while True:
                self._waiting[stream] = True
                data = os.read(fd, 65536)
                self._waiting[stream] = False
                if not data:
                    break
                buf += data
                lines = buf.split(b"\n")
                buf = lines.pop()
                if len(buf) > MAX_LINE_BYTES:
                    lines.append(buf[:MAX_LINE_BYTES])
                    buf = b""
                for raw in lines:
                    self._hand_on(stream, raw.decode("utf-8", "replace").rstrip("\r"))
                self._chunks += 1
            if buf:  # a last line without a newline
                self._hand_on(stream, buf.decode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            self._waiting[stream] = False
            self._closed.add(stream)
            with contextlib.suppress(OSError):
                pipe.close()

    def _hand_on(self, stream: str, line: str) -> None:
        """To the tap (the diagnoser sees every line), then to the writer; a full queue (the
        journal cannot keep up) drops the line and counts it."""
        if self._tap is not None:
            self._tap(line)
        try:
            self._q.put_nowait((stream, line))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def drained(self, pipes: dict[str, IO[bytes]]) -> bool:
        """True when every stream is closed, or its reader waits on an empty pipe."""
        for name, pipe in pipes.items():
            if name in self._closed:
                continue
            if not self._waiting.get(name):
                return False
            try:
                pending = struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD,
                                                         b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                continue
            if pending:
                return False
        return True

    def wait_drained(self, pipes: dict[str, IO[bytes]], timeout: float) -> bool:
        """Bounded wait until the lines a dead process wrote have all been seen by the tap."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunks = self._chunks
            if self.drained(pipes):
                time.sleep(0.001)
                if chunks == self._chunks and self.drained(pipes):
                    return True
            else:
                time.sleep(0.002)
        return False

    def _write_loop(self) -> None:
        get, get_nowait = self._q.get, self._q.get_nowait
        while True:
            item = get()
            if item is None:
                return
            batch = [item]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 2048:
                    nxt = get_nowait()
                    if nxt is None:
                        self._sink(batch)
                        self.forwarded += len(batch)
                        return
                    batch.append(nxt)
            self._sink(batch)
            self.forwarded += len(batch)

    def close(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the readers to hit EOF and the writer to flush."""
        for t in self._readers:
            t.join(timeout)
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            return
        self._writer.join(timeout)


class Child:
    """A running vLLM: its Popen, the output pump and the exit waiter."""

    def __init__(self, proc: subprocess.Popen[bytes], pump: OutputPump) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pump = pump

    @classmethod
    def spawn(cls, spec: LaunchSpec, sink: LineSink, on_exit: ExitCallback,
              tap: LineTap | None = None, cwd: str | None = None) -> Child:
        try:
            proc = subprocess.Popen(
                list(spec.argv), env=dict(spec.env), cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True,
            )
        except OSError as e:
            raise SpawnError(f"cannot start {spec.argv[0]}: {e.strerror or e}") from e
        assert proc.stdout is not None and proc.stderr is not None
        pump = OutputPump(sink, tap)
        pump.start({"stdout": proc.stdout, "stderr": proc.stderr})
        child = cls(proc, pump)
        threading.Thread(target=child._wait, args=(on_exit,), name="vllm-waiter",
                         daemon=True).start()
        return child

    def _wait(self, on_exit: ExitCallback) -> None:
        rc = self.proc.wait()
        if rc < 0:
            on_exit(self.pid, None, -rc)
        else:
            on_exit(self.pid, rc, None)
