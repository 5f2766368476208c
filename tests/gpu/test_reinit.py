"""NVML errors at runtime: re-init with backoff, driven by sample() calls and a fake clock."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from gpuhelp import Rig, poll_for
from helpers.fake_nvml import FakeDevice

from nika_supervisor.gpu import NvmlState
from nika_supervisor.gpu import nvml as n


def codes(s: object) -> list[tuple[str, str]]:
    return [(str(f.klass), f.code) for f in s.findings]  # type: ignore[attr-defined]


def down_rig(rig_factory: Callable[..., Rig], **cfg: object) -> Rig:
    r = rig_factory([FakeDevice()], **cfg)
    assert r.mon.start() is None
    r.fake.fail("nvmlDeviceGetPowerUsage", n.ERROR_UNKNOWN, times=1)
    s = r.sample()
    assert codes(s) == [("warn", "nvml.error")]
    assert "GPU 0" in s.findings[0].reason and "UNKNOWN" in s.findings[0].reason
    assert r.mon.state is NvmlState.DOWN
    w = r.mon._watcher
    if w is not None:
        poll_for(lambda: not w.alive(), 2, "the watcher to stop")
    return r


def test_runtime_error_that_clears_on_reinit_restarts_vllm(rig_factory: Callable[..., Rig]) -> None:
    """A runtime NVML error goes DOWN (WARN); the re-init that clears it yields RESTART."""
    r = down_rig(rig_factory)
    inits = r.fake.calls["nvmlInit"]
    assert r.sample(after=0.5).findings == []  # backoff not over: no re-init yet
    assert r.fake.calls["nvmlInit"] == inits
    s = r.sample(after=0.6)
    assert codes(s) == [("restart", "nvml.recovered")]
    assert r.mon.state is NvmlState.UP and r.fake.calls["nvmlInit"] == inits + 1
    assert r.fake.calls["nvmlShutdown"] >= 1  # the old session was shut before the new init
    assert r.sample().nvml == "up" and r.mon.events_supported


def test_reinit_backs_off_exponentially(rig_factory: Callable[..., Rig]) -> None:
    """Failing re-inits are retried after 1, 2, 4, 8 ... seconds, capped at 60."""
    r = down_rig(rig_factory, nvml="optional")
    r.fake.init_error = n.ERROR_DRIVER_NOT_LOADED
    attempts_at = []
    for _ in range(400):
        before = r.fake.calls["nvmlInit"]
        r.sample(after=0.5)
        if r.fake.calls["nvmlInit"] > before:
            attempts_at.append(r.clock.now() - 1000.0)
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(attempts_at)]
    assert gaps[:7] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert attempts_at[0] == 1.0


def test_required_and_down_too_long_is_fatal(rig_factory: Callable[..., Rig]) -> None:
    """Under nvml: required, NVML that stays down for 5 minutes is FATAL nvml.unavailable."""
    r = down_rig(rig_factory, nvml="required")
    r.fake.init_error = n.ERROR_UNKNOWN
    seen = []
    for _ in range(80):
        seen += codes(r.sample(after=5.0))
    assert seen == [("fatal", "nvml.unavailable")]
    assert r.mon.state is NvmlState.FATAL


def test_optional_and_down_too_long_warns_once_and_keeps_trying(
        rig_factory: Callable[..., Rig]) -> None:
    """Under nvml: optional it is a single warning; re-init keeps going and can still recover."""
    r = down_rig(rig_factory, nvml="optional")
    r.fake.init_error = n.ERROR_UNKNOWN
    seen = []
    for _ in range(120):
        seen += codes(r.sample(after=5.0))
    assert seen == [("warn", "nvml.unavailable")]
    r.fake.init_error = None
    for _ in range(20):
        seen += codes(r.sample(after=5.0))
    assert seen[-1] == ("restart", "nvml.recovered")
    assert r.mon.state is NvmlState.UP


def test_fatal_code_on_reinit_is_fatal(rig_factory: Callable[..., Rig]) -> None:
    """A re-init meeting a driver/library mismatch is fatal at once: driver upgraded, reboot."""
    r = down_rig(rig_factory)
    r.fake.init_error = n.ERROR_LIB_RM_VERSION_MISMATCH
    s = r.sample(after=1.0)
    assert codes(s) == [("fatal", "nvml.version_mismatch")]
    assert r.mon.state is NvmlState.FATAL


def test_gpu_lost_while_sampling_is_fatal(rig_factory: Callable[..., Rig]) -> None:
    """GPU_IS_LOST from a reading is FATAL nvml.gpu_lost for that device, with no re-init."""
    dev = FakeDevice()
    r = rig_factory([FakeDevice(uuid="GPU-x"), dev])
    r.mon.start()
    dev.lost = True
    s = r.sample()
    assert codes(s) == [("fatal", "nvml.gpu_lost")] and s.findings[0].device == 1
    assert "GPU needs reset/reboot" in s.findings[0].hint
    assert r.mon.state is NvmlState.FATAL
    inits = r.fake.calls["nvmlInit"]
    r.sample(after=600)
    assert r.fake.calls["nvmlInit"] == inits


def test_reinit_that_finds_a_gpu_missing_is_fatal_when_required(
        rig_factory: Callable[..., Rig]) -> None:
    """If a watched GPU is gone after re-init (fell off the bus), required makes it fatal."""
    r = rig_factory([FakeDevice(), FakeDevice(uuid="GPU-1")], devices=(0, 1))
    r.mon.start()
    r.fake.fail("nvmlDeviceGetTemperature", n.ERROR_UNKNOWN, times=1)
    r.sample()
    poll_for(lambda: r.mon._watcher is None or not r.mon._watcher.alive(), 2, "watcher stop")
    r.fake.devices.pop()
    assert codes(r.sample(after=1.0)) == [("fatal", "gpu.no_device")]
