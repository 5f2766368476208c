"""Reading /proc: process groups, marked orphans, and whether a port is free.

Linux only, no psutil. Zombies count as dead: they hold no memory and no GPU context.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    pgid: int
    name: str  # /proc/PID/comm, e.g. "VLLM::EngineCor" (comm is cut at 15 characters)
    state: str  # R, S, D, Z, T, ...


def _stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    lpar, rpar = raw.find("("), raw.rfind(")")
    fields = raw[rpar + 2:].split()
    # fields[0] = state, [1] = ppid, [2] = pgrp
    return ProcInfo(pid=pid, pgid=int(fields[2]), name=raw[lpar + 1:rpar], state=fields[0])


def proc_info(pid: int) -> ProcInfo | None:
    return _stat(pid)


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def group_members(pgid: int) -> list[ProcInfo]:
    """Live (non-zombie) processes whose process group is pgid."""
    out = []
    for pid in all_pids():
        info = _stat(pid)
        if info is not None and info.pgid == pgid and info.state != "Z":
            out.append(info)
    return out


def pid_alive(pid: int) -> bool:
    info = _stat(pid)
    return info is not None and info.state != "Z"


def environ_has(pid: int, key: str, value: str) -> bool:
    needle = f"{key}={value}".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def scan_marked(key: str, value: str, exclude_pgid: int | None = None) -> list[ProcInfo]:
    """Processes whose environment carries key=value: children of some instance of this
    daemon with the same unit and config. With the daemon's own group excluded, these are
    orphans left by an earlier instance (one that was SIGKILLed, say)."""
    me = os.getpid()
    out = []
    for pid in all_pids():
        if pid == me:
            continue
        info = _stat(pid)
        if info is None or info.state == "Z" or info.pgid == exclude_pgid:
            continue
        if environ_has(pid, key, value):
            out.append(info)
    return out


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group. False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; we cannot signal it (a different user)


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def port_holder(host: str, port: int) -> str | None:
    """None if host:port can be bound now; else a description of why not.

    SO_REUSEADDR as uvicorn sets it, so a socket in TIME_WAIT does not count as busy.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"address {host} does not exist on this host"
            return f"cannot bind {host}:{port}: {e.strerror}"
    return None
