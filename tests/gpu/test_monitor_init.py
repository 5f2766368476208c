"""NVML start-up: required vs optional vs off, fatal init codes, and this machine's real NVML."""

from __future__ import annotations

import glob
from collections.abc import Callable

import pytest
from gpuhelp import Rig
from helpers.fake_nvml import FakeDevice

from nika_supervisor.config import GpuConfig
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.gpu import FailureClass, GpuMonitor, Nvml, NvmlState
from nika_supervisor.gpu import nvml as n

NO_DRIVER = not glob.glob("/dev/nvidiactl")
UNAVAILABLE = [n.ERROR_DRIVER_NOT_LOADED, n.ERROR_LIBRARY_NOT_FOUND, n.ERROR_UNINITIALIZED,
               n.ERROR_NO_PERMISSION, n.ERROR_UNKNOWN]


def test_fine_start_watches_all_devices_and_starts_the_event_thread(
        rig_factory: Callable[..., Rig]) -> None:
    """A healthy NVML gives no finding, state UP, and event registration on every device."""
    r = rig_factory([FakeDevice(), FakeDevice(uuid="GPU-1")])
    assert r.mon.start() is None
    assert r.mon.state is NvmlState.UP
    assert r.mon.devices == (0, 1)
    assert r.mon.events_supported is True
    assert r.fake.registered == {0: n.EVENT_XID_CRITICAL | n.EVENT_DOUBLE_BIT_ECC,
                                 1: n.EVENT_XID_CRITICAL | n.EVENT_DOUBLE_BIT_ECC}


@pytest.mark.parametrize("code", UNAVAILABLE)
def test_required_and_unavailable_is_fatal(rig_factory: Callable[..., Rig], code: int) -> None:
    """With nvml: required, a failing nvmlInit is a FATAL finding (the daemon exits 80)."""
    r = rig_factory(nvml="required")
    r.fake.init_error = code
    f = r.mon.start()
    assert f is not None and (f.klass, f.code) == (FailureClass.FATAL, "nvml.unavailable")
    assert n.error_name(code) in f.reason
    assert r.mon.state is NvmlState.FATAL
    assert ExitCode.GPU_FATAL == 80


@pytest.mark.parametrize("code", UNAVAILABLE)
def test_optional_and_unavailable_warns_then_every_call_is_a_no_op(
        rig_factory: Callable[..., Rig], code: int) -> None:
    """With nvml: optional, a failing nvmlInit warns once and sampling touches NVML no more."""
    r = rig_factory(nvml="optional")
    r.fake.init_error = code
    f = r.mon.start()
    assert f is not None and (f.klass, f.code) == (FailureClass.WARN, "nvml.unavailable")
    calls = sum(r.fake.calls.values())
    s = r.sample((1,), after=3600)
    assert (s.nvml, s.devices, s.findings, s.vllm_resident_bytes) == ("off", (), [], None)
    assert s.status_text() == ""
    assert sum(r.fake.calls.values()) == calls


@pytest.mark.parametrize("nvml", ["required", "optional"])
def test_version_mismatch_is_fatal_even_when_optional(rig_factory: Callable[..., Rig],
                                                      nvml: str) -> None:
    """An upgraded driver breaks CUDA too: "driver upgraded: reboot" whatever gpu.nvml says."""
    r = rig_factory(nvml=nvml)
    r.fake.init_error = n.ERROR_LIB_RM_VERSION_MISMATCH
    f = r.mon.start()
    assert f is not None and (f.klass, f.code) == (FailureClass.FATAL, "nvml.version_mismatch")
    assert "driver upgraded: reboot" in f.hint


def test_off_never_calls_nvml(rig_factory: Callable[..., Rig]) -> None:
    """gpu.nvml: off gives no finding and makes no NVML call at all."""
    r = rig_factory(nvml="off")
    assert r.mon.start() is None
    r.sample((1,))
    assert r.mon.state is NvmlState.OFF
    assert sum(r.fake.calls.values()) == 0


def test_a_configured_gpu_that_is_missing_is_fatal_when_required(
        rig_factory: Callable[..., Rig]) -> None:
    """gpu.devices naming an absent GPU (fallen off the bus?) is fatal under required."""
    r = rig_factory(nvml="required", devices=(0, 3))
    f = r.mon.start()
    assert f is not None and (f.klass, f.code) == (FailureClass.FATAL, "gpu.no_device")
    assert "GPU 3" in f.reason
    assert r.mon.state is NvmlState.FATAL


def test_a_configured_gpu_that_is_missing_warns_when_optional(
        rig_factory: Callable[..., Rig]) -> None:
    """Under optional, the missing GPU is a warning and the present ones are watched."""
    r = rig_factory(nvml="optional", devices=(0, 3))
    f = r.mon.start()
    assert f is not None and (f.klass, f.code) == (FailureClass.WARN, "gpu.no_device")
    assert r.mon.state is NvmlState.UP and r.mon.devices == (0,)


def test_cuda_visible_devices_from_vllm_env_selects_the_watched_gpu() -> None:
    """vllm.env's CUDA_VISIBLE_DEVICES (a UUID here) picks the devices to watch."""
    from helpers.fake_nvml import FakePynvml
    fake = FakePynvml([FakeDevice(uuid="GPU-aaaa"), FakeDevice(uuid="GPU-bbbb")])
    mon = GpuMonitor(GpuConfig(nvml="required"), {"CUDA_VISIBLE_DEVICES": "GPU-bb"},
                     nvml=Nvml(fake), base_env={"CUDA_VISIBLE_DEVICES": "0"})
    try:
        assert mon.start() is None
        assert mon.devices == (1,)
    finally:
        mon.close()


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver")
def test_real_pynvml_init_fails_on_this_machine() -> None:
    """Without a driver the real pynvml.nvmlInit raises LIBRARY_NOT_FOUND / DRIVER_NOT_LOADED."""
    import pynvml  # nvidia-ml-py is a declared dependency
    with pytest.raises(pynvml.NVMLError) as e:
        pynvml.nvmlInit()
    assert e.value.value in (n.ERROR_LIBRARY_NOT_FOUND, n.ERROR_DRIVER_NOT_LOADED)


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver")
@pytest.mark.parametrize(("mode", "klass", "state"), [
    ("required", FailureClass.FATAL, NvmlState.FATAL),
    ("optional", FailureClass.WARN, NvmlState.OFF),
])
def test_real_nvml_without_a_driver_gives_the_right_finding(
        mode: str, klass: FailureClass, state: NvmlState) -> None:
    """Against the real library here: required -> FATAL (exit 80), optional -> WARN, HTTP only."""
    mon = GpuMonitor(GpuConfig(nvml=mode), {})
    try:
        f = mon.start()
        assert f is not None and (f.klass, f.code) == (klass, "nvml.unavailable")
        assert mon.state is state
        assert mon.sample([1]).devices == ()
    finally:
        mon.close()
