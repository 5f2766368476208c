"""A fake `pynvml` module: the same function names, scripted devices, injectable failures.

A test double, so it lives with the tests, not in the installed package. Used by tests/gpu/,
tests/doctor/, bench/component_bench.py and `bench/gpu_validate.py --fake`, and usable by
the daemon's in-process tests: `GpuMonitor(cfg, ..., nvml=Nvml(FakePynvml([...])))`. It
raises the real `pynvml.NVMLError` (nvidia-ml-py is a dependency) so the wrapper's error
handling is the code under test, not a copy of it.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from nika_supervisor.gpu import nvml as n

try:
    from pynvml import NVMLError as _NVMLError
except ImportError:  # pragma: no cover - nvidia-ml-py is a declared dependency

    class _NVMLError(Exception):  # type: ignore[no-redef]
        def __init__(self, value: int) -> None:
            self.value = value
            super().__init__(value)


GiB = 1024**3


@dataclass
class FakeDevice:
    """One scripted GPU. `memory=None` / `ecc=None` make those calls NOT_SUPPORTED (GB10)."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    temperature: int = 40
    power_mw: int = 70_000
    utilization: tuple[int, int] = (0, 0)
    clock_reasons: int = 0
    memory: tuple[int, int] | None = (1 * GiB, 80 * GiB)  # (used, total)
    ecc: tuple[int, int] | None = (0, 0)  # volatile (corrected, uncorrected)
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    supported_events: int = n.EVENT_XID_CRITICAL | n.EVENT_DOUBLE_BIT_ECC | n.EVENT_SINGLE_BIT_ECC
    lost: bool = False  # every call on it fails with GPU_IS_LOST


def gb10() -> FakeDevice:
    """A DGX Spark-like device: unified memory, so no memory info and no ECC."""
    return FakeDevice(name="NVIDIA GB10", uuid="GPU-gb10-0000", temperature=52, power_mw=35_000,
                      memory=None, ecc=None)


@dataclass(frozen=True)
class FakeHandle:
    index: int


class FakePynvml:
    """Implements the pynvml functions that `nvml.Nvml` calls."""

    NVMLError = _NVMLError

    def __init__(self, devices: list[FakeDevice] | None = None, driver: str = "580.159.04") -> None:
        self.devices = list(devices) if devices is not None else [FakeDevice()]
        self.driver = driver
        self.initialized = 0  # nvmlInit reference count, as NVML keeps one
        self.init_errors: list[int] = []  # consumed one per nvmlInit call
        self.init_error: int | None = None  # every nvmlInit fails with this
        self.failures: dict[str, tuple[int, int | None]] = {}  # name -> (code, times left)
        self.calls: Counter[str] = Counter()
        self.registered: dict[int, int] = {}  # device index -> event mask
        self._events: queue.Queue[tuple[int, int, int] | int] = queue.Queue()
        self._lock = threading.Lock()

    # -- scripting -------------------------------------------------------------------------------
    def fail(self, name: str, code: int, times: int | None = None) -> None:
        """Make pynvml function `name` raise `code`, `times` times (None: until cleared)."""
        self.failures[name] = (code, times)

    def clear(self, name: str) -> None:
        self.failures.pop(name, None)

    def inject_event(self, index: int, event_type: int, data: int = 0) -> None:
        """Deliver an event to whoever waits on an event set (an Xid: EVENT_XID_CRITICAL, xid)."""
        self._events.put((index, event_type, data))

    def inject_wait_error(self, code: int) -> None:
        """Make the next nvmlEventSetWait_v2 fail with `code`."""
        self._events.put(code)

    # -- helpers ---------------------------------------------------------------------------------
    def _enter(self, name: str, handle: FakeHandle | None = None) -> FakeDevice | None:
        self.calls[name] += 1
        with self._lock:
            if name in self.failures:
                code, times = self.failures[name]
                if times is not None:
                    if times <= 1:
                        del self.failures[name]
                    else:
                        self.failures[name] = (code, times - 1)
                raise self.NVMLError(code)
        if name != "nvmlInit" and not self.initialized:
            raise self.NVMLError(n.ERROR_UNINITIALIZED)
        if handle is None:
            return None
        dev = self.devices[handle.index]
        if dev.lost:
            raise self.NVMLError(n.ERROR_GPU_IS_LOST)
        return dev

    # -- library ---------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_errors:
            raise self.NVMLError(self.init_errors.pop(0))
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    # -- devices ---------------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise self.NVMLError(n.ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByUUID")
        for i, d in enumerate(self.devices):
            if d.uuid == uuid:
                return FakeHandle(i)
        raise self.NVMLError(n.ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, h: FakeHandle) -> int:
        self._enter("nvmlDeviceGetIndex", h)
        return h.index

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        dev = self._enter("nvmlDeviceGetName", h)
        assert dev is not None
        return dev.name

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        dev = self._enter("nvmlDeviceGetUUID", h)
        assert dev is not None
        return dev.uuid

    def nvmlDeviceGetTemperature(self, h: FakeHandle, sensor: int) -> int:
        dev = self._enter("nvmlDeviceGetTemperature", h)
        assert dev is not None
        return dev.temperature

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        dev = self._enter("nvmlDeviceGetPowerUsage", h)
        assert dev is not None
        return dev.power_mw

    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> Any:
        dev = self._enter("nvmlDeviceGetUtilizationRates", h)
        assert dev is not None
        return SimpleNamespace(gpu=dev.utilization[0], memory=dev.utilization[1])

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        dev = self._enter("nvmlDeviceGetCurrentClocksEventReasons", h)
        assert dev is not None
        return dev.clock_reasons

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle) -> Any:
        dev = self._enter("nvmlDeviceGetMemoryInfo", h)
        assert dev is not None
        if dev.memory is None:
            raise self.NVMLError(n.ERROR_NOT_SUPPORTED)
        used, total = dev.memory
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTotalEccErrors(self, h: FakeHandle, error_type: int, counter: int) -> int:
        dev = self._enter("nvmlDeviceGetTotalEccErrors", h)
        assert dev is not None
        if dev.ecc is None:
            raise self.NVMLError(n.ERROR_NOT_SUPPORTED)
        return dev.ecc[0] if error_type == 0 else dev.ecc[1]

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeHandle) -> list[Any]:
        dev = self._enter("nvmlDeviceGetComputeRunningProcesses", h)
        assert dev is not None
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in dev.processes]

    # -- events ----------------------------------------------------------------------------------
    def nvmlDeviceGetSupportedEventTypes(self, h: FakeHandle) -> int:
        dev = self._enter("nvmlDeviceGetSupportedEventTypes", h)
        assert dev is not None
        return dev.supported_events

    def nvmlEventSetCreate(self) -> object:
        self._enter("nvmlEventSetCreate")
        return object()

    def nvmlDeviceRegisterEvents(self, h: FakeHandle, mask: int, event_set: object) -> None:
        dev = self._enter("nvmlDeviceRegisterEvents", h)
        assert dev is not None
        if mask & ~dev.supported_events:
            raise self.NVMLError(n.ERROR_NOT_SUPPORTED)
        self.registered[h.index] = mask

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait_v2")
        try:
            item = self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise self.NVMLError(n.ERROR_TIMEOUT) from None
        if isinstance(item, int):
            raise self.NVMLError(item)
        index, event_type, data = item
        return SimpleNamespace(device=FakeHandle(index), eventType=event_type, eventData=data,
                               gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._enter("nvmlEventSetFree")
