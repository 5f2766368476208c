"""Which GPUs vLLM uses: gpu.devices, else CUDA_VISIBLE_DEVICES, else all (pure).

CUDA_VISIBLE_DEVICES semantics, per the CUDA Programming Guide, "CUDA Environment Variables"
(https://docs.nvidia.com/cuda/cuda-programming-guide/05-appendices/environment-variables.html):
unset = all GPUs; empty = none; a comma-separated list of indexes (as nvidia-smi numbers them)
or GPU UUIDs, where a unique prefix of the UUID ("GPU-8932f937") is enough; at the first
invalid entry the rest of the list is ignored. MIG entries ("MIG-...") name slices of a GPU;
they are not mapped here, so any MIG entry means "watch all GPUs".

Caveat: CUDA numbers GPUs fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, while NVML and
nvidia-smi number them by PCI bus. On hosts with identical GPUs the two orders agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

Resolve = Callable[[str], int | None]  # UUID or UUID prefix -> NVML index


def watched_devices(configured: tuple[int, ...] | None, env: Mapping[str, str], count: int,
                    by_uuid: Resolve) -> tuple[tuple[int, ...], str | None]:
    """(NVML indexes to watch, a problem to report or None).

    configured: gpu.devices (None = auto). env: vLLM's environment (vllm.env over the
    daemon's own, which vLLM inherits). count: NVML's device count.
    """
    if configured is not None:
        missing = [i for i in configured if i >= count]
        if missing:
            return (tuple(i for i in configured if i < count),
                    f"gpu.devices names GPU {', '.join(map(str, missing))} but NVML sees "
                    f"{count} GPU(s)")
        return tuple(dict.fromkeys(configured)), None
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return tuple(range(count)), None
    out: list[int] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            break
        if entry.startswith("MIG-"):
            return tuple(range(count)), None
        index: int | None
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if not 0 <= index < count:
                index = None
        else:
            index = by_uuid(entry)
        if index is None:
            problem = (f"CUDA_VISIBLE_DEVICES entry {entry!r} matches no GPU (NVML sees "
                       f"{count}); CUDA ignores it and everything after it")
            return tuple(dict.fromkeys(out)), problem
        out.append(index)
    return tuple(dict.fromkeys(out)), None


def uuid_resolver(uuids: Mapping[int, str]) -> Resolve:
    """A resolver over index -> UUID, accepting a unique prefix as CUDA does."""

    def resolve(text: str) -> int | None:
        hits = [i for i, u in uuids.items() if u == text or u.startswith(text)]
        return hits[0] if len(hits) == 1 else None

    return resolve
