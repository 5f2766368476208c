"""Who holds the GPUs: NVML compute processes plus a /proc scan of open /dev/nvidia* files.

The /proc scan is the `fuser /dev/nvidia*` equivalent. It also finds processes that NVML does
not list (a wedged process that holds the device open without a live context, the reference
host's "Failed to initialize NVML" case) and works with NVML off. It sees only what this
user may read: run as root (the unit does) to see every process.

Before each start the supervisor sorts holders into stale (carrying this daemon's marker in
their environment: left by an earlier instance, ended by the caller) and foreign (everyone
else). Only foreign *compute* processes on our GPUs block a start: they hold a CUDA context
and memory that vLLM sizes itself against (gpu-memory-utilization is a fraction of the whole
device). Processes that merely hold a device file open (nvidia-persistenced, Xorg, a
monitoring agent) are reported, never refused.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nika_supervisor import procs
from nika_supervisor.gpu.residency import format_bytes

DEVICE_GLOB = "/dev/nvidia*"


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    name: str
    used_bytes: int | None  # GPU memory per NVML; None from /proc alone
    source: str  # "nvml" (a compute process) or "procfs" (an open /dev/nvidia* file / marker)
    devices: tuple[int, ...] = ()  # NVML indexes, where NVML told

    def describe(self) -> str:
        mem = f", {format_bytes(self.used_bytes)}" if self.used_bytes is not None else ""
        on = f" on GPU {','.join(map(str, self.devices))}" if self.devices else ""
        return f"pid {self.pid} ({self.name}{mem}{on}, {self.source})"


@dataclass(frozen=True, slots=True)
class Preflight:
    stale: list[Holder] = field(default_factory=list)
    foreign: list[Holder] = field(default_factory=list)
    refuse_reason: str | None = None
    nvml: bool = False  # NVML compute processes were part of the scan


def scan_device_fds(device_glob: str = DEVICE_GLOB, proc_root: str = "/proc"
                    ) -> dict[int, tuple[str, ...]]:
    """pid -> the matching device paths it has open. Unreadable processes are skipped."""
    paths = set(glob.glob(device_glob))
    if not paths:
        return {}
    out: dict[int, tuple[str, ...]] = {}
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        fd_dir = f"{entry.path}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's (EACCES)
            continue
        found = set()
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target in paths:
                found.add(target)
        if found:
            out[int(entry.name)] = tuple(sorted(found))
    return out


def merge(nvml_procs: Mapping[int, tuple[int | None, tuple[int, ...]]],
          fd_holders: Mapping[int, tuple[str, ...]]) -> list[Holder]:
    """One Holder per pid: NVML's view (memory, devices) wins over /proc's."""
    out = []
    for pid in sorted(set(nvml_procs) | set(fd_holders)):
        info = procs.proc_info(pid)
        if info is not None and info.state == "Z":
            continue  # a zombie holds neither memory nor files
        name = info.name if info is not None else "?"
        if pid in nvml_procs:
            used, devices = nvml_procs[pid]
            out.append(Holder(pid, name, used, "nvml", devices))
        else:
            out.append(Holder(pid, name, None, "procfs"))
    return out


def classify(holders: Iterable[Holder], marked: Mapping[int, str], *, exclude: set[int],
             policy: str, nvml: bool) -> Preflight:
    """Sort holders into stale (marked) and foreign; say why a start is refused, if it is.

    marked: pid -> name of processes carrying this daemon's marker (they need not hold a GPU:
    an orphaned API server is stale too). exclude: our own pid and our own group's members.
    policy: gpu.stale_holders ("refuse" | "report").
    """
    by_pid = {h.pid: h for h in holders if h.pid not in exclude}
    stale = [by_pid.get(pid, Holder(pid, name, None, "procfs"))
             for pid, name in sorted(marked.items()) if pid not in exclude]
    foreign = [h for pid, h in sorted(by_pid.items()) if pid not in marked]
    blocking = [h for h in foreign if h.source == "nvml"]
    reason = None
    if policy == "refuse" and blocking:
        listed = "; ".join(h.describe() for h in blocking)
        total = sum(h.used_bytes or 0 for h in blocking)
        reason = (f"{len(blocking)} foreign process(es) hold {format_bytes(total)} on vLLM's "
                  f"GPUs: {listed}. Stop them, or set gpu.stale_holders: report to start anyway")
    return Preflight(stale=stale, foreign=foreign, refuse_reason=reason, nvml=nvml)


def marked_processes(key: str, value: str, own_pgid: int | None) -> dict[int, str]:
    """pid -> name of live processes whose environment carries key=value (procs.scan_marked)."""
    return {p.pid: p.name for p in procs.scan_marked(key, value, exclude_pgid=own_pgid)}


def group_pids(pgid: int | None) -> set[int]:
    if pgid is None:
        return set()
    return {p.pid for p in procs.group_members(pgid)}
