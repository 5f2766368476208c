"""One sampling pass: readings, GB10 unified memory, vLLM's resident bytes, WARN conditions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpuhelp import Rig, poll_for
from helpers.fake_nvml import FakeDevice, GiB, gb10

from nika_supervisor.gpu import nvml as n

MEMINFO = """MemTotal:       125410476 kB
MemFree:         1234567 kB
MemAvailable:   50744608 kB
Buffers:           12345 kB
"""


def codes(findings: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(str(f.klass), f.code) for f in findings]


def test_gb10_memory_not_supported_falls_back_to_meminfo(rig_factory: Callable[..., Rig],
                                                         tmp_path: Path) -> None:
    """On a GB10-like device NOT_SUPPORTED memory is no failure: /proc/meminfo gives the pool."""
    mi = tmp_path / "meminfo"
    mi.write_text(MEMINFO)
    dev = gb10()
    dev.processes = [(4321, int(68.1 * GiB)), (999, 1 * GiB)]
    r = rig_factory([dev], meminfo=str(mi))
    assert r.mon.start() is None
    s = r.sample((4321,))
    assert s.findings == [] and s.nvml == "up"
    d = s.devices[0]
    assert d.unified and d.memory_total == 125410476 * 1024
    assert d.memory_used == (125410476 - 50744608) * 1024
    assert d.ecc_corrected is None
    assert s.vllm_resident_bytes == int(68.1 * GiB)
    assert s.status_text() == "GB10 52C 35W unified 71.2/119.6GiB vllm 68.1GiB"
    f = s.fields()
    assert f["gpu0_unified"] is True and f["vllm_resident_gib"] == 68.1
    assert f["gpu0_mem_total_gib"] == 119.6


def test_unsupported_capabilities_are_not_asked_again(rig_factory: Callable[..., Rig],
                                                     tmp_path: Path) -> None:
    """NOT_SUPPORTED is remembered per device, so later passes skip those calls."""
    mi = tmp_path / "meminfo"
    mi.write_text(MEMINFO)
    r = rig_factory([gb10()], meminfo=str(mi))
    r.mon.start()
    for _ in range(5):
        r.sample()
    assert r.fake.calls["nvmlDeviceGetMemoryInfo"] == 1
    assert r.fake.calls["nvmlDeviceGetTotalEccErrors"] == 1
    assert r.fake.calls["nvmlDeviceGetTemperature"] == 5


def test_discrete_gpu_reading_and_status(rig_factory: Callable[..., Rig]) -> None:
    """An H100-like device shows its own memory, power in watts, and the vLLM figure."""
    dev = FakeDevice(temperature=61, power_mw=312_400, utilization=(87, 40),
                     memory=(int(70.2 * GiB), int(79.6 * GiB)), processes=[(10, 11 * GiB)])
    r = rig_factory([dev])
    r.mon.start()
    s = r.sample((10, 11))
    assert s.status_text() == "H100 80GB HBM3 61C 312W mem 70.2/79.6GiB vllm 11.0GiB"
    assert s.devices[0].processes == ((10, 11 * GiB),)
    assert s.fields()["gpu0_util_pct"] == 87


def test_resident_bytes_sum_over_devices_zero_when_absent_none_when_unknown(
        rig_factory: Callable[..., Rig]) -> None:
    """vLLM's resident memory sums its pids across watched GPUs; absent is 0, unknown None."""
    a = FakeDevice(processes=[(10, 5 * GiB), (77, 9 * GiB)])
    b = FakeDevice(uuid="GPU-b", processes=[(11, 6 * GiB)])
    r = rig_factory([a, b])
    r.mon.start()
    assert r.sample((10, 11)).vllm_resident_bytes == 11 * GiB
    assert r.sample((12,)).vllm_resident_bytes == 0
    assert r.sample(()).vllm_resident_bytes is None
    a.processes = [(10, None)]
    assert r.sample((10,)).vllm_resident_bytes is None


def test_temperature_warns_once_and_rearms_below_the_hysteresis(
        rig_factory: Callable[..., Rig]) -> None:
    """High temperature warns when it begins, not on every pass, and again after it cooled."""
    dev = FakeDevice(temperature=90)
    r = rig_factory([dev], temperature_warn=85.0)
    r.mon.start()
    assert codes(r.sample().findings) == [("warn", "gpu.temperature")]
    assert r.sample().findings == []
    dev.temperature = 82  # within 5C of the limit: still the same episode
    assert r.sample().findings == []
    dev.temperature = 70
    assert r.sample().findings == []
    dev.temperature = 88
    f = r.sample().findings
    assert codes(f) == [("warn", "gpu.temperature")] and "88C" in f[0].reason


def test_thermal_and_power_brake_throttling_warn_but_power_cap_does_not(
        rig_factory: Callable[..., Rig]) -> None:
    """HW/SW thermal, HW slowdown and power brake warn; the routine SW power cap does not."""
    dev = FakeDevice(clock_reasons=n.CLOCKS_SW_POWER_CAP)
    r = rig_factory([dev])
    r.mon.start()
    s = r.sample()
    assert s.findings == [] and s.devices[0].throttle == ("sw_power_cap",)
    dev.clock_reasons = n.CLOCKS_HW_THERMAL | n.CLOCKS_SW_POWER_CAP
    f = r.sample().findings
    assert codes(f) == [("warn", "gpu.throttle")] and "hw_thermal" in f[0].reason
    assert r.sample().findings == []


def test_single_bit_ecc_increase_warns(rig_factory: Callable[..., Rig]) -> None:
    """New corrected ECC errors since the last pass are a warning with the delta."""
    dev = FakeDevice(ecc=(3, 0))
    r = rig_factory([dev])
    r.mon.start()
    assert r.sample().findings == []  # the first reading is the baseline
    dev.ecc = (5, 0)
    f = r.sample().findings
    assert codes(f) == [("warn", "ecc.single_bit")] and "2 new" in f[0].reason


def test_double_bit_ecc_is_polled_when_events_are_unsupported(
        rig_factory: Callable[..., Rig]) -> None:
    """Without event support, a growing uncorrected ECC count restarts vLLM."""
    dev = FakeDevice(ecc=(0, 0), supported_events=0)
    r = rig_factory([dev])
    r.mon.start()
    assert r.mon.events_supported is False
    r.sample()
    dev.ecc = (0, 1)
    assert codes(r.sample().findings) == [("restart", "ecc.double_bit")]


def test_a_pass_reports_what_it_cost(rig_factory: Callable[..., Rig]) -> None:
    """Each pass carries its own duration, measured on the real clock (the injected clock
    stands still here); bench/component_bench.py reports the figure."""
    r = rig_factory([FakeDevice(processes=[(10, GiB)])])
    r.mon.start()
    before = time.perf_counter()
    s = r.sample((10,))
    assert 0 < s.duration_s <= time.perf_counter() - before


def test_sampling_never_waits_on_the_event_thread(rig_factory: Callable[..., Rig]) -> None:
    """While the watcher sits in one long event wait, 50 passes of sample() complete and the
    watcher is still in that same wait: sampling shares no lock with it."""
    r = rig_factory([FakeDevice()], event_timeout_ms=600_000)
    r.mon.start()
    poll_for(lambda: r.fake.calls["nvmlEventSetWait_v2"], 2, "the watcher to be waiting")
    done = threading.Event()

    def sample_50() -> None:
        for _ in range(50):
            r.sample()
        done.set()

    threading.Thread(target=sample_50, daemon=True).start()
    poll_for(done.is_set, 10, "50 passes of sample() while the watcher waits")
    assert r.fake.calls["nvmlEventSetWait_v2"] == 1, "the watcher's wait ended first"
    assert r.emitted == []
    # close() waits for the watcher; wake its long wait (as an NVML timeout would) until it ends.
    closer = threading.Thread(target=r.mon.close)
    closer.start()

    def closed() -> bool:
        r.fake.inject_wait_error(n.ERROR_TIMEOUT)
        return not closer.is_alive()

    poll_for(closed, 5, "close() to return")


def test_binding_exceptions_become_nvml_errors(rig_factory: Callable[..., Rig]) -> None:
    """A non-NVMLError from the binding (e.g. a version mismatch wrapper) never escapes sample()."""

    class NVMLLibraryMismatchError(Exception):
        pass

    r = rig_factory([FakeDevice()], nvml="optional")
    r.mon.start()

    def broken(h: object) -> int:
        raise NVMLLibraryMismatchError("Unversioned function called ...")

    r.fake.nvmlDeviceGetPowerUsage = broken  # type: ignore[method-assign]
    s = r.sample()
    assert [(str(f.klass), f.code) for f in s.findings] == [("warn", "nvml.error")]
    assert "FUNCTION_NOT_FOUND" in s.findings[0].reason


def test_old_driver_falls_back_to_v2_compute_processes(rig_factory: Callable[..., Rig]) -> None:
    """When the unversioned (v3) process query is missing, the _v2 one is used."""
    r = rig_factory([FakeDevice(processes=[(10, GiB)])])
    r.mon.start()
    r.fake.fail("nvmlDeviceGetComputeRunningProcesses", n.ERROR_FUNCTION_NOT_FOUND)
    r.fake.nvmlDeviceGetComputeRunningProcesses_v2 = (  # type: ignore[attr-defined]
        lambda h: [type("P", (), {"pid": 10, "usedGpuMemory": GiB})()])
    assert r.sample((10,)).vllm_resident_bytes == GiB
