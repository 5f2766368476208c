"""One sampling pass, as data: per-device readings, vLLM's resident memory, and the findings.

`status_text()` is the short form for systemd's STATUS; `fields()` is flat key/values for the
`gpu.sample` log event (flat so the console and key=value renderers show it on one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nika_supervisor.gpu.classes import GpuFinding

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class DeviceReading:
    index: int
    name: str
    temperature_c: int | None = None
    power_w: float | None = None
    util_gpu: int | None = None  # percent
    util_mem: int | None = None
    memory_used: int | None = None  # bytes; the system-wide figure when unified
    memory_total: int | None = None
    unified: bool = False  # memory from /proc/meminfo (GB10: NVML memory info NOT_SUPPORTED)
    throttle: tuple[str, ...] = ()
    ecc_corrected: int | None = None  # volatile, since driver load
    ecc_uncorrected: int | None = None
    processes: tuple[tuple[int, int | None], ...] = ()  # (pid, used bytes) compute processes


@dataclass(frozen=True, slots=True)
class GpuSample:
    nvml: str  # the monitor's NVML state: up | down | off | fatal
    devices: tuple[DeviceReading, ...] = ()
    vllm_resident_bytes: int | None = None
    findings: list[GpuFinding] = field(default_factory=list)
    duration_s: float = 0.0

    def status_text(self) -> str:
        """e.g. "GB10 52C 35W unified 71.2/119.6GiB vllm 68.1GiB"."""
        if self.nvml != "up":
            return {"down": "GPU: NVML error, re-initialising", "fatal": "GPU: fatal"}.get(
                self.nvml, "")
        parts = [_device_text(d) for d in self.devices]
        text = "; ".join(parts)
        if self.vllm_resident_bytes is not None:
            text += f" vllm {self.vllm_resident_bytes / GiB:.1f}GiB"
        return text.strip()

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {"nvml": self.nvml,
                                  "sample_ms": round(self.duration_s * 1000, 3)}
        for d in self.devices:
            p = f"gpu{d.index}_"
            out[p + "name"] = d.name
            out[p + "temp_c"] = d.temperature_c
            out[p + "power_w"] = None if d.power_w is None else round(d.power_w, 1)
            out[p + "util_pct"] = d.util_gpu
            out[p + "mem_used_gib"] = _gib(d.memory_used)
            out[p + "mem_total_gib"] = _gib(d.memory_total)
            out[p + "unified"] = d.unified
            if d.throttle:
                out[p + "throttle"] = ",".join(d.throttle)
            out[p + "procs"] = len(d.processes)
        out["vllm_resident_gib"] = _gib(self.vllm_resident_bytes)
        return out


def short_name(name: str) -> str:
    return name.removeprefix("NVIDIA ").strip() or name


def _device_text(d: DeviceReading) -> str:
    bits = [short_name(d.name)]
    if d.temperature_c is not None:
        bits.append(f"{d.temperature_c}C")
    if d.power_w is not None:
        bits.append(f"{d.power_w:.0f}W")
    if d.memory_used is not None and d.memory_total is not None:
        label = "unified" if d.unified else "mem"
        bits.append(f"{label} {d.memory_used / GiB:.1f}/{d.memory_total / GiB:.1f}GiB")
    if d.throttle:
        bits.append("throttled:" + ",".join(d.throttle))
    return " ".join(bits)


def _gib(b: int | None) -> float | None:
    return None if b is None else round(b / GiB, 2)
