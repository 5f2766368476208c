"""Plumbing for bench/gpu_systemd.py: the private systemd root, the unit's journal events,
and what the host sees of the unit's processes (seccomp, capabilities, NVML)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import systemd_harness as harness

T = TypeVar("T")
UNIT = "nika-vllm.service"
# Packages that must come from the carried .debs even where the host has a copy: systemd
# itself. Everything else is a library the host's own (newer, same soname) copy may replace.
TOP_PACKAGES = ("systemd", "libsystemd-shared")


def unpack_debs(debs: Path, sysroot: Path) -> list[str]:
    """dpkg -x every .deb into sysroot/top or sysroot/fallback (never into /), then move
    /bin, /sbin and /lib* under usr/ (Debian 12's packages still ship /lib/systemd/...,
    merged-/usr hosts have /lib -> usr/lib)."""
    names = []
    for deb in sorted(debs.glob("*.deb")):
        pkg = subprocess.run(["dpkg-deb", "-f", str(deb), "Package"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dest = sysroot / ("top" if pkg in TOP_PACKAGES else "fallback")
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
        names.append(pkg)
    for part in ("top", "fallback"):
        root = sysroot / part
        (root / "usr").mkdir(parents=True, exist_ok=True)
        for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            src = root / d
            if src.is_dir() and not src.is_symlink():
                subprocess.run(["cp", "-a", f"{src}/.", str(root / "usr" / d)], check=True)
                shutil.rmtree(src)
    missing = [p for p in TOP_PACKAGES if p not in names]
    if missing:
        raise RuntimeError(f"{debs} lacks {missing} (apt-get download {' '.join(missing)})")
    return names


def wait_for(pred: Callable[[], T | None], timeout: float, interval: float = 0.3) -> T | None:
    """The first truthy value of pred within timeout, else None (a check records it)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class Events:
    """The daemon's JSON events (supervisor.log_format: json) from the unit's journal."""

    def __init__(self, ns: harness.Namespace) -> None:
        self.ns = ns

    @staticmethod
    def mark() -> int:
        return time.monotonic_ns() // 1000  # the journal's __MONOTONIC_TIMESTAMP scale

    def entries(self) -> list[dict[str, Any]]:
        return self.ns.journal_json("-u", UNIT)

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        out = []
        for e in self.entries():
            if int(e.get("__MONOTONIC_TIMESTAMP", 0)) <= after:
                continue
            msg = e.get("MESSAGE", "")
            if isinstance(msg, list):
                msg = bytes(msg).decode("utf-8", "replace")
            with contextlib.suppress(ValueError):
                ev = json.loads(msg)
                if isinstance(ev, dict):
                    ev["_mono_s"] = int(e["__MONOTONIC_TIMESTAMP"]) / 1e6
                    out.append(ev)
        return out

    def wait(self, name: str, after: int, timeout: float,
             pred: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        def find() -> dict[str, Any] | None:
            for ev in self.events(after):
                if ev.get("event") == name and (pred is None or pred(ev)):
                    return ev
            return None
        return wait_for(find, timeout, 0.5)

    def lines(self) -> list[str]:
        out = []
        for e in self.entries():
            msg = e.get("MESSAGE", "")
            out.append(bytes(msg).decode("utf-8", "replace") if isinstance(msg, list)
                       else str(msg))
        return out

    def grep(self, pattern: str) -> list[str]:
        rx = re.compile(pattern, re.I)
        return [ln[:400] for ln in self.lines() if rx.search(ln)]

    def tail(self, n: int) -> list[str]:
        return [ln[:400] for ln in self.lines()[-n:]]


def proc_security(ns: harness.Namespace, host_pid: int) -> dict[str, str]:
    """What the kernel says about a process of the unit: seccomp mode (2 = filter),
    NoNewPrivs, effective capabilities, and its user (from the namespace's /etc/passwd)."""
    fields: dict[str, str] = {"host_pid": str(host_pid)}
    try:
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Name", "Seccomp", "NoNewPrivs", "CapEff", "CapBnd", "Uid"):
                fields[key] = value.split()[0] if key == "Uid" else value.strip()
    except OSError as e:
        fields["error"] = str(e)
    users = {ln.split(":")[2]: ln.split(":")[0]
             for ln in ns.path("/etc/passwd").read_text().splitlines() if ln.count(":") >= 3}
    fields["user"] = users.get(fields.get("Uid", ""), "?")
    return fields


def host_nvml_pids() -> list[int]:
    """Compute processes on every GPU, as the host's NVML lists them."""
    import pynvml

    pynvml.nvmlInit()
    try:
        pids: list[int] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            pids += [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
        return pids
    finally:
        pynvml.nvmlShutdown()


class _ProgQuery(ctypes.Structure):
    """union bpf_attr for BPF_PROG_QUERY (linux/bpf.h)."""

    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 64)]


def device_bpf_programs(cgroup: Path) -> dict[str, Any]:
    """The BPF_CGROUP_DEVICE programs attached to / effective on a cgroup (bpf(2)
    BPF_PROG_QUERY; x86-64 syscall 321): evidence that systemd applied DevicePolicy=."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, Any] = {}
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        return {"error": str(e)}
    try:
        for name, flags in (("attached", 0), ("effective", 1)):  # BPF_F_QUERY_EFFECTIVE
            ids = (ctypes.c_uint32 * 16)()
            q = _ProgQuery(target_fd=fd, attach_type=6, query_flags=flags,  # BPF_CGROUP_DEVICE
                           prog_ids=ctypes.addressof(ids), prog_cnt=16)
            rc = libc.syscall(321, 16, ctypes.byref(q), ctypes.sizeof(q))  # BPF_PROG_QUERY
            out[name] = list(ids[:q.prog_cnt]) if rc == 0 else f"errno {ctypes.get_errno()}"
    finally:
        os.close(fd)
    return out
