"""The GPU monitor: NVML life cycle, one cheap sampling pass per call, preflight, events.

About 430 lines: NVML's states, re-init and the per-device readings share one lock and
one handle table, so they stay together.

States (`NvmlState`), all transitions made here:

    start() --init ok--> UP --NVML error--> DOWN --re-init ok--> UP   (RESTART "nvml.recovered")
       |                  |                   |--re-init fails--> DOWN (backoff 1, 2, 4 .. 60 s)
       |                  |                   '--fatal code / required and down > 5 min--> FATAL
       |                  '--GPU lost / reset required / version mismatch / Xid 79 ..--> FATAL
       '--init fails--> FATAL (required, or a fatal code) | OFF (optional: HTTP checks only)
    gpu.nvml: off --> OFF

Only `start()`, `sample()`, `preflight()` and `close()` are called, all from the main thread;
re-init is driven by `sample()` calls and an injected clock, so nothing here sleeps. The one
other thread is the event watcher (events.py), which reports through `emit`.
WARN findings are edge-triggered: one when a condition begins, again only after it cleared.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any

from nika_supervisor.budget import capped_backoff
from nika_supervisor.config import GpuConfig
from nika_supervisor.gpu import holders as hl
from nika_supervisor.gpu import nvml as n
from nika_supervisor.gpu.classes import FailureClass, GpuFinding, condition, nvml_fatal_finding
from nika_supervisor.gpu.devices import uuid_resolver, watched_devices
from nika_supervisor.gpu.events import EventWatcher
from nika_supervisor.gpu.sample import DeviceReading, GpuSample
from nika_supervisor.meminfo import read_meminfo, used_and_total

# Clock-event reasons worth a warning. SW power cap is left out on purpose: a busy GPU sits
# at its power limit as a matter of course (NVML: "SW Power Scaling algorithm is reducing the
# clocks below requested clocks"), so it is shown in the sample but never warned about.
WARN_CLOCK_REASONS = (n.CLOCKS_SW_THERMAL | n.CLOCKS_HW_THERMAL | n.CLOCKS_HW_SLOWDOWN
                      | n.CLOCKS_HW_POWER_BRAKE)
TEMPERATURE_REARM_C = 5.0  # a temperature warning re-arms this far below the limit


class NvmlState(StrEnum):
    OFF = "off"
    UP = "up"
    DOWN = "down"
    FATAL = "fatal"


# Every move the monitor may make (the diagram above). FATAL is left only by close().
NVML_ALLOWED: dict[NvmlState, frozenset[NvmlState]] = {
    NvmlState.OFF: frozenset({NvmlState.UP, NvmlState.FATAL}),
    NvmlState.UP: frozenset({NvmlState.DOWN, NvmlState.FATAL, NvmlState.OFF}),
    NvmlState.DOWN: frozenset({NvmlState.UP, NvmlState.FATAL, NvmlState.OFF}),
    NvmlState.FATAL: frozenset({NvmlState.OFF}),
}


class _DeviceError(Exception):
    def __init__(self, device: int, error: n.NvmlError) -> None:
        self.device = device
        self.error = error


class GpuMonitor:
    reinit_backoff_initial = 1.0
    reinit_backoff_max = 60.0
    reinit_give_up = 300.0  # with gpu.nvml: required, NVML down this long is fatal

    def __init__(self, cfg: GpuConfig, vllm_env: Mapping[str, str] | None = None,
                 emit: Callable[[GpuFinding], None] | None = None, *,
                 nvml: n.Nvml | None = None, clock: Callable[[], float] = time.monotonic,
                 base_env: Mapping[str, str] | None = None, meminfo_path: str = "/proc/meminfo",
                 device_glob: str = hl.DEVICE_GLOB, proc_root: str = "/proc",
                 event_timeout_ms: int = 500, log: Any = None) -> None:
        self._base_env = dict(os.environ if base_env is None else base_env)
        self.configure(cfg, vllm_env)
        self.log = log
        self._emit = emit or (lambda f: None)
        self.nvml = nvml or n.Nvml()
        self.clock = clock
        self.meminfo_path = meminfo_path
        self.device_glob = device_glob
        self.proc_root = proc_root
        self.event_timeout_ms = event_timeout_ms
        self._lock = threading.Lock()
        self._state = NvmlState.OFF
        self.handles: dict[int, Any] = {}
        self.names: dict[int, str] = {}
        self.driver_version: str | None = None
        self.events_supported: bool | None = None  # None until NVML was up
        self._watcher: EventWatcher | None = None
        self._unsupported: dict[int, set[str]] = {}
        self._ecc: dict[int, tuple[int | None, int | None]] = {}
        self._warned: set[tuple[str, int]] = set()
        self._initialized = False
        self._down_error: n.NvmlError | None = None
        self._down_since = 0.0
        self._attempts = 0
        self._next_reinit = 0.0
        self._gave_up_reported = False

    # ------------------------------------------------------------------------- state
    @property
    def state(self) -> NvmlState:
        return self._state

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(self.handles)

    def configure(self, cfg: GpuConfig, vllm_env: Mapping[str, str] | None = None) -> None:
        """The running configuration (at start and on every reload)."""
        self.cfg = cfg
        # vLLM inherits the daemon's environment; vllm.env overrides it (command.build_env).
        self.env = {**self._base_env, **(vllm_env or {})}

    def _set_state(self, new: NvmlState, why: str) -> None:
        """Every move goes through here: checked against NVML_ALLOWED and logged."""
        with self._lock:
            old = self._state
            if new is old:
                return
            # The event thread may declare FATAL while the main thread handles an error of
            # the same fault: FATAL stays, and says so.
            refused = old is NvmlState.FATAL and new is not NvmlState.OFF
            assert refused or new in NVML_ALLOWED[old], f"NVML {old} -> {new} ({why})"
            if not refused:
                self._state = new
        if self.log is not None:
            fields = {"from": str(old), "to": str(old if refused else new), "why": why}
            if refused:
                fields["refused"] = str(new)
            self.log.info("gpu.nvml_state", **fields)

    # ------------------------------------------------------------------------- start
    def start(self) -> GpuFinding | None:
        """Initialise NVML once. None when fine; else a FATAL or WARN finding (see module doc)."""
        if self.cfg.nvml == "off":
            self._set_state(NvmlState.OFF, "gpu.nvml: off")
            return None
        try:
            problem = self._open()
        except n.NvmlError as e:
            self._quiet_shutdown()
            return self._init_failed(e)
        if problem is not None and self.cfg.nvml == "required":
            return self._no_device(problem)
        self._set_state(NvmlState.UP, "nvml up")
        if problem is None:
            return None
        f = condition("gpu.no_device", what=problem)  # optional: watch what there is
        return GpuFinding(FailureClass.WARN, f.code, f.reason, f.hint)

    def _open(self) -> str | None:
        """nvmlInit, the watched devices and the event thread (start and re-init alike).
        Returns a problem with the devices, if any; raises NvmlError."""
        self.nvml.init()
        self._initialized = True
        problem = self._open_devices()
        self._start_events()
        return problem

    def _no_device(self, problem: str) -> GpuFinding:
        self._set_state(NvmlState.FATAL, f"no usable device: {problem}")
        self._stop_watcher()
        return condition("gpu.no_device", what=problem)

    def _init_failed(self, e: n.NvmlError) -> GpuFinding:
        fatal = nvml_fatal_finding(e.code, None)
        if fatal is not None:
            self._set_state(NvmlState.FATAL, f"fatal init error: {e}")
            return fatal
        if self.cfg.nvml == "required":
            self._set_state(NvmlState.FATAL, f"required and init failed: {e}")
            return condition("nvml.unavailable", error=str(e))
        self._set_state(NvmlState.OFF, f"optional and init failed: {e}")
        return condition("nvml.unavailable.optional", error=str(e))

    def _open_devices(self) -> str | None:
        """Handles of the watched devices; a problem to report (missing GPUs), or None."""
        self.driver_version = self.nvml.driver_version()
        count = self.nvml.device_count()
        all_handles = {i: self.nvml.handle(i) for i in range(count)}
        uuids: dict[int, str] = {}
        if any(not e.strip().isdigit() for e in self.env.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if e.strip()):
            uuids = {i: self.nvml.uuid(h) for i, h in all_handles.items()}
        watched, problem = watched_devices(self.cfg.devices, self.env, count,
                                           uuid_resolver(uuids))
        if count == 0:
            problem = "NVML sees no GPU"
        self.handles = {i: all_handles[i] for i in watched}
        self.names = {i: self.nvml.name(h) for i, h in self.handles.items()}
        for i in self.handles:
            self._unsupported.setdefault(i, set())
        return problem

    def _start_events(self) -> None:
        w = EventWatcher(self.nvml, self.handles, self._on_event, self.event_timeout_ms)
        try:
            masks = w.register()
        except n.NvmlError:
            w.free()
            masks = {}  # events are a bonus: polling still covers ECC
        self.events_supported = bool(masks)
        if masks:
            w.start()
            self._watcher = w

    def _on_event(self, finding: GpuFinding) -> None:
        """Called on the watcher thread."""
        if finding.klass is FailureClass.FATAL:
            self._set_state(NvmlState.FATAL, f"fatal event: {finding.code}")
        self._emit(finding)

    # ------------------------------------------------------------------------- sample
    def sample(self, vllm_pids: Iterable[int] = (), now: float | None = None) -> GpuSample:
        """One pass over the watched devices; cheap, never blocks (see module doc)."""
        t0 = time.perf_counter()
        now = self.clock() if now is None else now
        findings: list[GpuFinding] = []
        readings: tuple[DeviceReading, ...] = ()
        resident: int | None = None
        if self._state is NvmlState.DOWN:
            findings += self._maybe_reinit(now)
        if self._state is NvmlState.UP:
            w = self._watcher
            if w is not None and w.error is not None:
                findings += self._went_down(w.error, now, None)
            else:
                try:
                    readings, resident = self._read_all(frozenset(vllm_pids), findings)
                except _DeviceError as e:
                    findings += self._went_down(e.error, now, e.device)
        return GpuSample(str(self._state), readings, resident, findings,
                         time.perf_counter() - t0)

    def _opt(self, device: int, what: str, fn: Callable[[Any], Any], h: Any) -> Any:
        """fn(h), or None for a capability the device lacks (remembered: not asked again)."""
        if what in self._unsupported[device]:
            return None
        try:
            return fn(h)
        except n.NvmlError as e:
            if e.code == n.ERROR_NOT_SUPPORTED:
                self._unsupported[device].add(what)
                return None
            raise _DeviceError(device, e) from None

    def _read_all(self, pids: frozenset[int], findings: list[GpuFinding]
                  ) -> tuple[tuple[DeviceReading, ...], int | None]:
        nv = self.nvml
        out = []
        resident = 0
        resident_known = bool(pids)
        for i, h in self.handles.items():
            temp = self._opt(i, "temperature", nv.temperature, h)
            power = self._opt(i, "power", nv.power_mw, h)
            util = self._opt(i, "utilization", nv.utilization, h)
            reasons = self._opt(i, "clocks", nv.clock_event_reasons, h) or 0
            mem = self._opt(i, "memory", nv.memory, h)
            unified = mem is None and "memory" in self._unsupported[i]
            if unified:
                mem = used_and_total(read_meminfo(self.meminfo_path))
            corrected = self._opt(i, "ecc", lambda x: nv.ecc_volatile(x, corrected=True), h)
            uncorrected = (self._opt(i, "ecc", lambda x: nv.ecc_volatile(x, corrected=False), h)
                           if corrected is not None else None)
            procs = self._opt(i, "processes", nv.compute_processes, h)
            if procs is None:
                resident_known = False
            else:
                for p in procs:
                    if p.pid in pids:
                        if p.used_bytes is None:
                            resident_known = False
                        else:
                            resident += p.used_bytes
            out.append(DeviceReading(
                index=i, name=self.names.get(i, "?"), temperature_c=temp,
                power_w=None if power is None else power / 1000.0,
                util_gpu=None if util is None else util[0],
                util_mem=None if util is None else util[1],
                memory_used=None if mem is None else mem[0],
                memory_total=None if mem is None else mem[1], unified=unified,
                throttle=tuple(name for bit, name in n.CLOCK_REASON_NAMES.items()
                               if reasons & bit),
                ecc_corrected=corrected, ecc_uncorrected=uncorrected,
                processes=tuple((p.pid, p.used_bytes) for p in procs or ())))
            findings += self._judge(i, temp, reasons, corrected, uncorrected)
        return tuple(out), (resident if resident_known else None)

    def _edge(self, key: str, device: int, on: bool) -> bool:
        """True when condition `key` on `device` just began."""
        k = (key, device)
        if not on:
            self._warned.discard(k)
            return False
        if k in self._warned:
            return False
        self._warned.add(k)
        return True

    def _judge(self, i: int, temp: int | None, reasons: int, corrected: int | None,
               uncorrected: int | None) -> list[GpuFinding]:
        out = []
        limit = self.cfg.temperature_warn
        if temp is not None:
            hot = temp >= limit or (("gpu.temperature", i) in self._warned
                                    and temp > limit - TEMPERATURE_REARM_C)
            if self._edge("gpu.temperature", i, hot):
                out.append(condition("gpu.temperature", i, temperature=temp, limit=limit))
        bad = reasons & WARN_CLOCK_REASONS
        if self._edge("gpu.throttle", i, bool(bad)):
            names = ", ".join(name for bit, name in n.CLOCK_REASON_NAMES.items() if bad & bit)
            out.append(condition("gpu.throttle", i, reasons=names))
        last_c, last_u = self._ecc.get(i, (corrected, uncorrected))
        if corrected is not None and last_c is not None and corrected > last_c:
            out.append(condition("ecc.single_bit", i, delta=corrected - last_c, total=corrected))
        w = self._watcher
        dbe_by_event = w is not None and bool(w.masks.get(i, 0) & n.EVENT_DOUBLE_BIT_ECC)
        if (uncorrected is not None and last_u is not None and uncorrected > last_u
                and not dbe_by_event):
            out.append(condition("ecc.double_bit", i))
        self._ecc[i] = (corrected, uncorrected)
        return out

    # ------------------------------------------------------------------------- down / re-init
    def _went_down(self, e: n.NvmlError, now: float, device: int | None) -> list[GpuFinding]:
        self._stop_watcher()
        fatal = nvml_fatal_finding(e.code, device)
        if fatal is not None:
            self._set_state(NvmlState.FATAL, f"fatal NVML error: {e}")
            return [fatal]
        self._set_state(NvmlState.DOWN, f"NVML error: {e}")
        self._down_error = e
        self._down_since = now
        self._attempts = 0
        self._next_reinit = now + self.reinit_backoff_initial
        self._gave_up_reported = False
        where = f"GPU {device}: " if device is not None else ""
        return [condition("nvml.error", device, error=where + str(e))]

    def _backoff(self) -> float:
        return capped_backoff(self.reinit_backoff_initial, self.reinit_backoff_max,
                              self._attempts)

    def _maybe_reinit(self, now: float) -> list[GpuFinding]:
        if now < self._next_reinit:
            return []
        w = self._watcher
        if w is not None:
            if w.alive():
                return []  # it stops after its current wait; try on a later call
            w.free()
            self._watcher = None
        self._quiet_shutdown()
        try:
            problem = self._open()
        except n.NvmlError as e:
            self._quiet_shutdown()
            return self._reinit_failed(e, now)
        if problem is not None and self.cfg.nvml == "required":
            return [self._no_device(problem)]
        self._set_state(NvmlState.UP, "re-init ok")
        err = str(self._down_error) if self._down_error else "?"
        self._down_error = None
        return [condition("nvml.recovered", error=err)]

    def _reinit_failed(self, e: n.NvmlError, now: float) -> list[GpuFinding]:
        fatal = nvml_fatal_finding(e.code, None)
        if fatal is not None:
            self._set_state(NvmlState.FATAL, f"fatal re-init error: {e}")
            return [fatal]
        self._attempts += 1
        self._next_reinit = now + self._backoff()
        if now - self._down_since < self.reinit_give_up or self._gave_up_reported:
            return []
        self._gave_up_reported = True
        what = f"{e}; down for {now - self._down_since:.0f}s"
        if self.cfg.nvml == "required":
            self._set_state(NvmlState.FATAL, "required and down too long")
            return [condition("nvml.unavailable", error=what)]
        return [condition("nvml.unavailable.optional", error=what)]

    # ------------------------------------------------------------------------- holders
    def preflight(self, marker_key: str, marker_value: str, own_pgid: int | None = None
                  ) -> hl.Preflight:
        """Stale (marked) and foreign GPU holders before a start; see holders.py."""
        nvml_procs: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        used_nvml = False
        if self._state is NvmlState.UP:
            try:
                for i, h in self.handles.items():
                    for p in self.nvml.compute_processes(h):
                        used, devs = nvml_procs.get(p.pid, (None, ()))
                        if p.used_bytes is not None:
                            used = (used or 0) + p.used_bytes
                        nvml_procs[p.pid] = (used, (*devs, i))
                used_nvml = True
            except n.NvmlError:
                nvml_procs = {}  # sample() will meet the error and handle it
        found = hl.merge(nvml_procs, hl.scan_device_fds(self.device_glob, self.proc_root))
        marked = hl.marked_processes(marker_key, marker_value, own_pgid)
        exclude = {os.getpid()} | hl.group_pids(own_pgid)
        return hl.classify(found, marked, exclude=exclude, policy=self.cfg.stale_holders,
                           nvml=used_nvml)

    # ------------------------------------------------------------------------- close
    def _stop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    def _quiet_shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            with contextlib.suppress(n.NvmlError):
                self.nvml.shutdown()

    def close(self) -> None:
        """Stop the event thread (it ends after its current wait, ~1 s) and shut NVML down."""
        w = self._watcher
        if w is not None:
            w.stop()
            w.join(self.event_timeout_ms / 1000 + 2.0)
            w.free()
            self._watcher = None
        if not (w is not None and w.alive()):
            self._quiet_shutdown()
        self._set_state(NvmlState.OFF, "closed")
