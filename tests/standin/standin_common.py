"""The stand-in's plumbing: environment knobs, vLLM-style log lines, the state directory.
(Part of the stand-in server; see standin_server.py for what it is and its knobs.)"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

STARTED_MONO = time.monotonic()  # when this interpreter got going, on the shared clock


# ------------------------------------------------------------------------------ environment


def env_float(name: str, default: float | None = None) -> float | None:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "")
    return raw.strip() not in ("", "0", "false", "no") if raw.strip() else default


# ---------------------------------------------------------------------------------- logging


def log(level: str, where: str, message: str, role: str = "APIServer",
        stream: Any = None) -> None:
    """One line with one write(2), no lock: signal handlers log too, and a handler that
    re-enters while the interrupted code holds a lock would deadlock. A pipe write of up to
    PIPE_BUF bytes is atomic (pipe(7)), so concurrent lines do not interleave."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    line = f"({role} pid={os.getpid()}) {level} {stamp} [{where}] {message}\n"
    fd = (stream or sys.stdout).fileno()
    with contextlib.suppress(OSError):
        write_all(fd, line.encode("utf-8", "replace"))


def emit_numbered_lines(n: int) -> float:
    """Write n numbered lines to stdout as fast as possible; return the seconds it took."""
    start = time.monotonic()
    pid = os.getpid()
    stamp = time.strftime("%m-%d %H:%M:%S")
    head = f"(APIServer pid={pid}) INFO {stamp} [standin.py:1] standin line "
    tail = " " + "x" * 60 + "\n"
    fd = sys.stdout.fileno()
    sys.stdout.flush()
    chunk: list[str] = []
    for i in range(1, n + 1):
        chunk.append(f"{head}{i:06d}{tail}")
        if len(chunk) == 512:
            write_all(fd, "".join(chunk).encode())
            chunk = []
    chunk.append(f"(APIServer pid={pid}) INFO {stamp} [standin.py:2] standin log done {n}\n")
    write_all(fd, "".join(chunk).encode())
    return time.monotonic() - start


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------------------------ state files


class StateDir:
    """Atomic files that let tests find the stand-in's processes and what it saw."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            os.makedirs(path, exist_ok=True)

    def write(self, name: str, text: str) -> None:
        if not self.path:
            return
        tmp = os.path.join(self.path, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.path, name))

    def clear(self, *names: str) -> None:
        for name in names:
            if self.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.write(name, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def record_start(self, role: str, pid: int) -> None:
        """One O_APPEND write per process: the cleanup list of every pid ever started."""
        if not self.path:
            return
        fd = os.open(os.path.join(self.path, "starts.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{role} {pid}\n".encode())
        finally:
            os.close(fd)


def preexisting_standins(state_dir: str | None) -> list[int]:
    """Live processes (not zombies) carrying this same STANDIN_STATE_DIR, other than us: the
    survivors of an earlier start. A supervisor must have ended them before starting us."""
    if not state_dir:
        return []
    needle = f"STANDIN_STATE_DIR={state_dir}".encode()
    me, found = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[0] != "Z":
            found.append(int(d))
    return sorted(found)


def set_comm(name: str) -> None:
    """Retitle this process as vLLM does; the kernel keeps 15 characters (proc(5), comm)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name[:15])
