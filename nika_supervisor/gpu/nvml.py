"""A thin typed wrapper over `pynvml` (the nvidia-ml-py package): the only module that calls it.

Every call goes through the module object given to `Nvml`, so the tests substitute a fake
module with the same function names (`FakePynvml` in tests/helpers/fake_nvml.py) and the real
translation code below still runs. Every `pynvml.NVMLError` becomes an `NvmlError` carrying
the numeric `nvmlReturn_t`, which `classes.py` maps to a failure class.

The numbers below are the NVML C ABI (nvml.h), stable across driver releases; they are
repeated here so that the fake does not need them and the table in classes.py can name them.
Source: NVML API Reference, "Device Enums / nvmlReturn_t" and "Event Types",
https://docs.nvidia.com/deploy/nvml-api/ (and the same constants in nvidia-ml-py's pynvml.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

# nvmlReturn_t
SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_ALREADY_INITIALIZED = 5
ERROR_NOT_FOUND = 6
ERROR_INSUFFICIENT_SIZE = 7
ERROR_INSUFFICIENT_POWER = 8
ERROR_DRIVER_NOT_LOADED = 9
ERROR_TIMEOUT = 10
ERROR_IRQ_ISSUE = 11
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_CORRUPTED_INFOROM = 14
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_OPERATING_SYSTEM = 17
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_IN_USE = 19
ERROR_MEMORY = 20
ERROR_NO_DATA = 21
ERROR_INSUFFICIENT_RESOURCES = 23
ERROR_NOT_READY = 27
ERROR_GPU_NOT_FOUND = 28
ERROR_UNKNOWN = 999
# Not an NVML code: nvidia-ml-py itself is not installed (ImportError).
ERROR_MODULE_MISSING = -1

_ERROR_NAMES = {
    ERROR_UNINITIALIZED: "UNINITIALIZED", ERROR_INVALID_ARGUMENT: "INVALID_ARGUMENT",
    ERROR_NOT_SUPPORTED: "NOT_SUPPORTED", ERROR_NO_PERMISSION: "NO_PERMISSION",
    ERROR_ALREADY_INITIALIZED: "ALREADY_INITIALIZED", ERROR_NOT_FOUND: "NOT_FOUND",
    ERROR_INSUFFICIENT_SIZE: "INSUFFICIENT_SIZE", ERROR_INSUFFICIENT_POWER: "INSUFFICIENT_POWER",
    ERROR_DRIVER_NOT_LOADED: "DRIVER_NOT_LOADED", ERROR_TIMEOUT: "TIMEOUT",
    ERROR_IRQ_ISSUE: "IRQ_ISSUE", ERROR_LIBRARY_NOT_FOUND: "LIBRARY_NOT_FOUND",
    ERROR_FUNCTION_NOT_FOUND: "FUNCTION_NOT_FOUND", ERROR_CORRUPTED_INFOROM: "CORRUPTED_INFOROM",
    ERROR_GPU_IS_LOST: "GPU_IS_LOST", ERROR_RESET_REQUIRED: "RESET_REQUIRED",
    ERROR_OPERATING_SYSTEM: "OPERATING_SYSTEM",
    ERROR_LIB_RM_VERSION_MISMATCH: "LIB_RM_VERSION_MISMATCH", ERROR_IN_USE: "IN_USE",
    ERROR_MEMORY: "MEMORY", ERROR_NO_DATA: "NO_DATA",
    ERROR_INSUFFICIENT_RESOURCES: "INSUFFICIENT_RESOURCES", ERROR_NOT_READY: "NOT_READY",
    ERROR_GPU_NOT_FOUND: "GPU_NOT_FOUND", ERROR_UNKNOWN: "UNKNOWN",
    ERROR_MODULE_MISSING: "MODULE_MISSING",
}

# nvmlEventType bits
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_XID_CRITICAL = 0x8

# nvmlClocksEventReasons (formerly ...ThrottleReasons) bits
CLOCKS_GPU_IDLE = 0x1
CLOCKS_APP_SETTING = 0x2
CLOCKS_SW_POWER_CAP = 0x4
CLOCKS_HW_SLOWDOWN = 0x8
CLOCKS_SYNC_BOOST = 0x10
CLOCKS_SW_THERMAL = 0x20
CLOCKS_HW_THERMAL = 0x40
CLOCKS_HW_POWER_BRAKE = 0x80
CLOCKS_DISPLAY_SETTING = 0x100
CLOCK_REASON_NAMES = {
    CLOCKS_SW_POWER_CAP: "sw_power_cap", CLOCKS_HW_SLOWDOWN: "hw_slowdown",
    CLOCKS_SW_THERMAL: "sw_thermal", CLOCKS_HW_THERMAL: "hw_thermal",
    CLOCKS_HW_POWER_BRAKE: "hw_power_brake",
}

_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
_MEMORY_ERROR_CORRECTED = 0  # NVML_MEMORY_ERROR_TYPE_CORRECTED
_MEMORY_ERROR_UNCORRECTED = 1
_VOLATILE_ECC = 0  # NVML_VOLATILE_ECC: since the last driver load


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"ERROR_{code}")


class NvmlError(Exception):
    """An NVML call failed; `code` is the nvmlReturn_t (or ERROR_MODULE_MISSING)."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.name = error_name(code)
        self.detail = detail
        super().__init__(f"NVML_ERROR_{self.name}" + (f": {detail}" if detail else ""))


class Event(NamedTuple):
    handle: Any
    event_type: int
    event_data: int  # the Xid for EVENT_XID_CRITICAL


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    used_bytes: int | None  # None where NVML cannot tell (NVML_VALUE_NOT_AVAILABLE)


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as e:
        raise NvmlError(ERROR_MODULE_MISSING, f"nvidia-ml-py is not installed ({e})") from None
    return pynvml


class Nvml:
    """The NVML calls this package makes, typed, with errors as `NvmlError`.

    `module` is `pynvml` (imported on first use) or a stand-in with the same names.
    """

    def __init__(self, module: Any | None = None) -> None:
        self._m = module

    @property
    def module(self) -> Any:
        if self._m is None:
            self._m = _load_pynvml()
        return self._m

    def _call(self, name: str, *args: Any) -> Any:
        m = self.module
        fn: Callable[..., Any] | None = getattr(m, name, None)
        if fn is None:
            raise NvmlError(ERROR_FUNCTION_NOT_FOUND, f"{name} is not in this nvidia-ml-py")
        try:
            return fn(*args)
        except m.NVMLError as e:
            raise NvmlError(int(e.value), _describe(e)) from None
        except Exception as e:
            # pynvml raises NVMLLibraryMismatchError (not an NVMLError) when an unversioned
            # function is missing from the driver's library; anything else the binding throws
            # (ctypes, a half-loaded library) must not escape into the supervisor loop either.
            code = (ERROR_FUNCTION_NOT_FOUND if type(e).__name__ == "NVMLLibraryMismatchError"
                    else ERROR_UNKNOWN)
            raise NvmlError(code, f"{type(e).__name__}: {e}") from None

    # -- library -----------------------------------------------------------------------------
    def init(self) -> None:
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    # -- devices -----------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def handle(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def handle_by_uuid(self, uuid: str) -> Any:
        return self._call("nvmlDeviceGetHandleByUUID", uuid)

    def index(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetIndex", handle))

    def name(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetName", handle))

    def uuid(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetUUID", handle))

    # -- readings (each may raise NOT_SUPPORTED: a missing capability, not a failure) --------
    def temperature(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetTemperature", handle, _TEMPERATURE_GPU))

    def power_mw(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetPowerUsage", handle))

    def utilization(self, handle: Any) -> tuple[int, int]:
        u = self._call("nvmlDeviceGetUtilizationRates", handle)
        return int(u.gpu), int(u.memory)

    def clock_event_reasons(self, handle: Any) -> int:
        # nvmlDeviceGetCurrentClocksThrottleReasons was renamed ...ClocksEventReasons in NVML 12.x
        # and the old name is deprecated (pynvml.py comments); older bindings have only the old.
        try:
            return int(self._call("nvmlDeviceGetCurrentClocksEventReasons", handle))
        except NvmlError as e:
            if e.code != ERROR_FUNCTION_NOT_FOUND:
                raise
        return int(self._call("nvmlDeviceGetCurrentClocksThrottleReasons", handle))

    def memory(self, handle: Any) -> tuple[int, int]:
        """(used, total) bytes of the device's own memory. NOT_SUPPORTED on GB10 (unified)."""
        m = self._call("nvmlDeviceGetMemoryInfo", handle)
        return int(m.used), int(m.total)

    def ecc_volatile(self, handle: Any, *, corrected: bool) -> int:
        kind = _MEMORY_ERROR_CORRECTED if corrected else _MEMORY_ERROR_UNCORRECTED
        return int(self._call("nvmlDeviceGetTotalEccErrors", handle, kind, _VOLATILE_ECC))

    def compute_processes(self, handle: Any) -> list[Process]:
        try:
            raw = self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        except NvmlError as e:
            if e.code != ERROR_FUNCTION_NOT_FOUND:
                raise
            # A driver older than the binding: its library lacks the _v3 struct the
            # unversioned call maps to (pynvml's throwOnVersionMismatch); _v2 is older.
            raw = self._call("nvmlDeviceGetComputeRunningProcesses_v2", handle)
        out = []
        for p in raw:
            used = p.usedGpuMemory  # pynvml maps NVML_VALUE_NOT_AVAILABLE to None
            out.append(Process(int(p.pid), None if used is None else int(used)))
        return out

    # -- events --------------------------------------------------------------------------------
    def supported_event_types(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetSupportedEventTypes", handle))

    def event_set_create(self) -> Any:
        return self._call("nvmlEventSetCreate")

    def register_events(self, handle: Any, mask: int, event_set: Any) -> None:
        self._call("nvmlDeviceRegisterEvents", handle, mask, event_set)

    def event_wait(self, event_set: Any, timeout_ms: int) -> Event | None:
        """The next event, or None when none came within timeout_ms (NVML_ERROR_TIMEOUT)."""
        try:
            d = self._call("nvmlEventSetWait_v2", event_set, timeout_ms)
        except NvmlError as e:
            if e.code == ERROR_TIMEOUT:
                return None
            raise
        return Event(d.device, int(d.eventType), int(d.eventData))

    def event_set_free(self, event_set: Any) -> None:
        self._call("nvmlEventSetFree", event_set)


def _describe(e: Exception) -> str:
    try:
        return str(e)  # pynvml's text, e.g. "Driver Not Loaded"
    except Exception:
        return ""


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
