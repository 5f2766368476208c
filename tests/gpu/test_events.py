"""Xid and ECC events arriving while vLLM serves: emitted from the watcher thread at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

from gpuhelp import Rig, poll_for
from helpers.fake_nvml import FakeDevice, GiB

from nika_supervisor.gpu import FailureClass, NvmlState
from nika_supervisor.gpu import nvml as n


def serving_rig(rig_factory: Callable[..., Rig]) -> Rig:
    r = rig_factory([FakeDevice(processes=[(10, 40 * GiB)]),
                     FakeDevice(uuid="GPU-1", processes=[(11, 40 * GiB)])])
    assert r.mon.start() is None
    assert r.sample((10, 11)).vllm_resident_bytes == 80 * GiB
    return r


def test_application_xid_while_serving_emits_restart_from_the_watcher_thread(
        rig_factory: Callable[..., Rig]) -> None:
    """Xid 13 on GPU 1 reaches emit() from the watcher thread, classed RESTART, device 1."""
    r = serving_rig(rig_factory)
    threads: list[str] = []
    r.mon._emit = lambda f: (threads.append(threading.current_thread().name),
                             r.emitted.append(f))
    r.fake.inject_event(1, n.EVENT_XID_CRITICAL, 13)
    poll_for(lambda: r.emitted, 2, "the Xid finding")
    f = r.emitted[0]
    assert (f.klass, f.code, f.device) == (FailureClass.RESTART, "xid.13", 1)
    assert threads == ["nika-gpu-events"]
    assert r.mon.state is NvmlState.UP  # the GPU is fine; only vLLM restarts
    assert r.sample((10, 11)).nvml == "up"


def test_gpu_lost_xid_is_fatal_and_stops_sampling(rig_factory: Callable[..., Rig]) -> None:
    """Xid 79 emits FATAL, and the monitor stops touching NVML."""
    r = serving_rig(rig_factory)
    r.fake.inject_event(0, n.EVENT_XID_CRITICAL, 79)
    poll_for(lambda: r.emitted, 2, "the Xid finding")
    assert (r.emitted[0].klass, r.emitted[0].code) == (FailureClass.FATAL, "xid.79")
    assert r.mon.state is NvmlState.FATAL
    calls = r.fake.calls["nvmlDeviceGetTemperature"]
    s = r.sample((10,))
    assert s.nvml == "fatal" and s.devices == () and s.status_text() == "GPU: fatal"
    assert r.fake.calls["nvmlDeviceGetTemperature"] == calls


def test_double_bit_ecc_event_restarts(rig_factory: Callable[..., Rig]) -> None:
    """A DoubleBitEcc event is a RESTART finding for that device."""
    r = serving_rig(rig_factory)
    r.fake.inject_event(0, n.EVENT_DOUBLE_BIT_ECC)
    poll_for(lambda: r.emitted, 2, "the ECC finding")
    assert (r.emitted[0].klass, r.emitted[0].code, r.emitted[0].device) == (
        FailureClass.RESTART, "ecc.double_bit", 0)


def test_several_events_are_all_delivered_in_order(rig_factory: Callable[..., Rig]) -> None:
    """Events queued back to back come out one finding each, in order."""
    r = serving_rig(rig_factory)
    for xid in (31, 4242, 95):
        r.fake.inject_event(0, n.EVENT_XID_CRITICAL, xid)
    poll_for(lambda: len(r.emitted) == 3, 2, "three findings")
    assert [(str(f.klass), f.code) for f in r.emitted] == [
        ("restart", "xid.31"), ("warn", "xid.4242"), ("fatal", "xid.95")]


def test_wait_failing_with_gpu_lost_is_fatal(rig_factory: Callable[..., Rig]) -> None:
    """nvmlEventSetWait returning GPU_IS_LOST is emitted as FATAL nvml.gpu_lost."""
    r = serving_rig(rig_factory)
    r.fake.inject_wait_error(n.ERROR_GPU_IS_LOST)
    poll_for(lambda: r.emitted, 2, "the finding")
    assert (r.emitted[0].klass, r.emitted[0].code) == (FailureClass.FATAL, "nvml.gpu_lost")
    assert r.mon.state is NvmlState.FATAL


def test_other_wait_errors_are_handed_to_the_main_thread(rig_factory: Callable[..., Rig]) -> None:
    """An unexpected wait error ends the watcher; the next sample() takes NVML down (WARN)."""
    r = serving_rig(rig_factory)
    w = r.mon._watcher
    assert w is not None
    r.fake.inject_wait_error(n.ERROR_UNKNOWN)
    poll_for(lambda: not w.alive(), 2, "the watcher to end")
    s = r.sample((10,))
    assert [(str(f.klass), f.code) for f in s.findings] == [("warn", "nvml.error")]
    assert r.mon.state is NvmlState.DOWN and r.emitted == []


def test_a_raising_emit_does_not_kill_the_watcher(rig_factory: Callable[..., Rig]) -> None:
    """If emit raises, the watcher counts it and keeps delivering."""
    r = serving_rig(rig_factory)
    seen: list[str] = []

    def emit(f: object) -> None:
        seen.append(getattr(f, "code", "?"))
        if len(seen) == 1:
            raise RuntimeError("queue closed")

    r.mon._emit = emit
    r.fake.inject_event(0, n.EVENT_XID_CRITICAL, 13)
    r.fake.inject_event(0, n.EVENT_XID_CRITICAL, 43)
    poll_for(lambda: len(seen) == 2, 2, "two deliveries")
    assert seen == ["xid.13", "xid.43"]
    assert r.mon._watcher is not None and r.mon._watcher.emit_errors == 1


def test_no_event_support_means_no_thread(rig_factory: Callable[..., Rig]) -> None:
    """Devices that cannot report events start no watcher; events_supported says so."""
    r = rig_factory([FakeDevice(supported_events=n.EVENT_SINGLE_BIT_ECC)])
    assert r.mon.start() is None
    assert r.mon.events_supported is False
    assert r.fake.calls["nvmlEventSetWait_v2"] == 0
    assert not any(t.name == "nika-gpu-events" for t in threading.enumerate()
                   if t.is_alive() and getattr(t, "_target", None) is not None
                   and getattr(t._target, "__self__", None) is r.mon._watcher)


def test_close_ends_the_watcher(rig_factory: Callable[..., Rig]) -> None:
    """close() stops the watcher within its wait timeout and shuts NVML down."""
    r = serving_rig(rig_factory)
    w = r.mon._watcher
    assert w is not None and w.alive()
    r.mon.close()
    assert not w.alive()
    assert r.fake.initialized == 0
