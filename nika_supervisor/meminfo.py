"""/proc/meminfo, read in one place: the doctor's memory budget and the GPU sampler's
unified-memory figure (GB10) both come from here."""

from __future__ import annotations

PROC_MEMINFO = "/proc/meminfo"


def read_meminfo(path: str = PROC_MEMINFO) -> dict[str, int]:
    """The fields of a meminfo file, in bytes (a `kB` value times 1024, a unitless count as
    is); {} if it cannot be read. Lines that do not parse are left out."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def used_and_total(mem: dict[str, int]) -> tuple[int, int] | None:
    """(used, total) bytes of system memory, used = MemTotal - MemAvailable; None without both.

    The unified-memory figure for GB10, where NVML has no device memory info: the CPU and
    GPU share one pool, and MemAvailable is what the kernel could still hand out
    (proc(5): "an estimate of how much memory is available for starting new applications").
    """
    total, avail = mem.get("MemTotal"), mem.get("MemAvailable")
    if total is None or avail is None:
        return None
    return total - avail, total
