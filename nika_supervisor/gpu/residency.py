"""The residency rule (pure): after READY, vLLM's process group must keep GPU memory.

vLLM allocates its weights and KV cache once, at load, and holds them until it exits; a
serving vLLM whose group owns much less than it did at READY has lost its model (a crashed
engine whose API server still answers, a context torn down by an Xid, ...).

Default (`gpu.min_resident_memory: auto`): half of what the group held right after READY.
Half leaves room for allocator trimming (PyTorch's caching allocator can return a little
memory) while still catching "none" and "weights only, no KV cache".
"""

from __future__ import annotations

from nika_supervisor.gpu.classes import GpuFinding, condition

GiB = 1024**3


def residency_threshold(configured: int | None, held_at_ready: int | None) -> int | None:
    """The minimum resident bytes to enforce, or None when the rule is off/unknown.

    configured: gpu.min_resident_memory (None = auto, 0 = off, else bytes).
    held_at_ready: what the vLLM group held on its GPUs right after READY (None = unknown,
    e.g. NVML off; 0 = nothing, e.g. a CPU build: auto cannot derive a floor from that).
    """
    if configured is None:
        if not held_at_ready:
            return None
        return held_at_ready // 2
    if configured <= 0:
        return None
    return configured


def check_residency(threshold: int | None, resident: int | None) -> GpuFinding | None:
    """RESTART "model not resident" when resident < threshold; None when fine or unknown."""
    if threshold is None or resident is None or resident >= threshold:
        return None
    return condition("gpu.not_resident", resident=format_bytes(resident),
                     threshold=format_bytes(threshold))


def format_bytes(b: int) -> str:
    if b >= GiB:
        return f"{b / GiB:.1f}GiB"
    return f"{b / 1024**2:.0f}MiB"
