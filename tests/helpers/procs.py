"""Is it gone? /proc reads that count zombies as dead (they hold no memory, no GPU, no port).

Independent of nika_supervisor.procs on purpose: the tests must not check the daemon with
the daemon's own code.
"""

from __future__ import annotations

import os


def proc_state(pid: int) -> tuple[str, int, str] | None:
    """(state letter, pgid, comm) from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    fields = raw[rpar + 2:].split()
    return fields[0], int(fields[2]), raw[lpar + 1:rpar]


def pid_alive(pid: int) -> bool:
    st = proc_state(pid)
    return st is not None and st[0] != "Z"


def group_members(pgid: int) -> list[tuple[int, str, str]]:
    """Live (non-zombie) members of a process group: (pid, state, comm)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = proc_state(int(d))
        if st is not None and st[1] == pgid and st[0] != "Z":
            out.append((int(d), st[0], st[2]))
    return out


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def environ_has(pid: int, key: str, value: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{key}={value}".encode() in f.read().split(b"\0")
    except OSError:
        return False
