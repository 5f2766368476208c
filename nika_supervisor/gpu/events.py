"""The Xid/ECC event thread: waits in nvmlEventSetWait_v2 so the main loop never does.

Registration follows NVIDIA's k8s-device-plugin (internal/rm/health.go): per device, the
wanted mask ANDed with nvmlDeviceGetSupportedEventTypes; NVML_ERROR_NOT_SUPPORTED means "this
device cannot report events" (then the ECC counters are polled instead). The wait returns
NVML_ERROR_TIMEOUT when nothing happened (NVML API, nvmlEventSetWait), which is the thread's
chance to notice a stop request, so stopping takes about one `timeout_ms` (an H100 on driver
580.159.04 returned from a 500 ms wait after 1001 ms: docs/GPU-VALIDATION.md).

The thread never touches the monitor's state except through `on_finding`; any other wait
error is left in `error` for the main thread to handle (re-init with backoff).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from nika_supervisor.gpu import nvml as n
from nika_supervisor.gpu.classes import GpuFinding, condition, nvml_fatal_finding, xid_finding

WANTED = n.EVENT_XID_CRITICAL | n.EVENT_DOUBLE_BIT_ECC


class EventWatcher:
    def __init__(self, nvml: n.Nvml, handles: Mapping[int, Any],
                 on_finding: Callable[[GpuFinding], None], timeout_ms: int = 500) -> None:
        self._nvml = nvml
        self._handles = dict(handles)
        self._on_finding = on_finding
        self._timeout_ms = timeout_ms
        self._stop = threading.Event()
        self._set: Any = None
        self._thread: threading.Thread | None = None
        self.masks: dict[int, int] = {}  # device -> registered event mask
        self.error: n.NvmlError | None = None  # a wait failure the main thread must handle
        self.delivered = 0
        self.emit_errors = 0

    def register(self) -> dict[int, int]:
        """Register every device that supports the wanted events; {} when none can."""
        wanted = {}
        for index, h in self._handles.items():
            try:
                mask = WANTED & self._nvml.supported_event_types(h)
            except n.NvmlError as e:
                if e.code != n.ERROR_NOT_SUPPORTED:
                    raise
                continue
            if mask:
                wanted[index] = mask
        if not wanted:
            return {}
        self._set = self._nvml.event_set_create()
        for index, mask in wanted.items():
            try:
                self._nvml.register_events(self._handles[index], mask, self._set)
            except n.NvmlError as e:
                if e.code != n.ERROR_NOT_SUPPORTED:
                    raise
                continue
            self.masks[index] = mask
        if not self.masks:
            self.free()
        return dict(self.masks)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nika-gpu-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it does after its current wait. Never blocks."""
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive()

    def free(self) -> None:
        if self._set is not None and not self.alive():
            with contextlib.suppress(n.NvmlError):
                self._nvml.event_set_free(self._set)
            self._set = None

    def _device_of(self, handle: Any) -> int | None:
        try:
            return self._nvml.index(handle)
        except n.NvmlError:
            return None

    def _deliver(self, finding: GpuFinding) -> None:
        self.delivered += 1
        try:
            self._on_finding(finding)
        except Exception:
            self.emit_errors += 1  # a broken emit must not kill the watcher

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ev = self._nvml.event_wait(self._set, self._timeout_ms)
            except n.NvmlError as e:
                fatal = nvml_fatal_finding(e.code, None)
                if fatal is not None:
                    self._deliver(fatal)
                else:
                    self.error = e
                return
            if ev is None:
                continue
            device = self._device_of(ev.handle)
            if ev.event_type & n.EVENT_XID_CRITICAL:
                self._deliver(xid_finding(ev.event_data, device))
            elif ev.event_type & n.EVENT_DOUBLE_BIT_ECC:
                self._deliver(condition("ecc.double_bit", device))
