"""The whole daemon in-process: `Supervisor` built with a fake NVML injected through its GPU
monitor factory, a real vLLM stand-in as the child, and the real loop (start/step/close).
This is where the daemon's GPU paths run in CI: a foreign holder refused, a model that is no
longer resident, a fatal GPU (exit 80), a finding while loading, and a reload that reaches
every component, the GPU monitor included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import write_config
from helpers.fake_nvml import FakeDevice, FakePynvml
from structlog.testing import capture_logs

from nika_supervisor import procs
from nika_supervisor.config import load_config
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.gpu import GpuMonitor, Nvml
from nika_supervisor.gpu import nvml as n
from nika_supervisor.notify import Notifier
from nika_supervisor.supervisor import Supervisor

GiB = 1024**3
Event = dict[str, Any]


class InProcess:
    """One Supervisor, stepped on the test's thread until a condition or a deadline."""

    def __init__(self, tmp_path: Path, logs: list[Event], devices: list[FakeDevice],
                 **overrides: Any) -> None:
        self.tmp_path, self.logs = tmp_path, logs
        self.fake = FakePynvml(devices)
        gpu = {"nvml": "required", "sample_interval": "1s", **overrides.pop("gpu", {})}
        self.path = write_config(tmp_path, gpu=gpu, **overrides)
        self.logging: list[tuple[str, str]] = []

        def monitor(cfg: Any, vllm_env: Any = None, emit: Any = None, log: Any = None
                    ) -> GpuMonitor:
            return GpuMonitor(cfg, vllm_env, emit, log=log, nvml=Nvml(self.fake), base_env={},
                              device_glob=str(tmp_path / "no-nvidia*"), event_timeout_ms=20)

        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.sup = Supervisor(load_config(str(self.path)), environ=env, notifier=Notifier({}),
                              gpu_factory=monitor,
                              configure_logging=lambda f, lvl: self.logging.append((f, lvl)))
        self.sup.start()

    def events(self, name: str) -> list[Event]:
        return [e for e in self.logs if e["event"] == name]

    def run_until(self, what: Callable[[], object], timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            if self.sup.final is not None:
                break
            self.sup.step(min(self.sup.timeout(), 0.05))
        got = what()
        assert got, ("not reached; phase " + str(self.sup.state.phase) + "; events: "
                     + str([e["event"] for e in self.logs if e["event"] != "gpu.sample"][-25:]))
        return got

    def wait_event(self, name: str, timeout: float = 20.0, **match: object) -> Event:
        def find() -> Event | None:
            return next((e for e in self.events(name)
                         if all(e.get(k) == v for k, v in match.items())), None)
        return self.run_until(find, timeout)

    def new_pid(self, old: int) -> int:
        """Wait for a vLLM other than `old` and return its pid."""
        return int(self.run_until(lambda: self.sup.state.pid not in (None, old)
                                  and self.sup.state.pid))

    def vllm_pid(self) -> int:
        pid = self.sup.state.pid
        assert pid is not None
        return pid

    def stop(self) -> int:
        if self.sup.final is None:
            self.sup.post_signal(signal.SIGTERM)
            self.run_until(lambda: self.sup.final is not None, 15)
        return self.sup.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., InProcess]]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    made: list[InProcess] = []
    with capture_logs() as logs:
        def make(devices: list[FakeDevice] | None = None, **overrides: Any) -> InProcess:
            d = InProcess(tmp_path, logs, devices or [FakeDevice()], **overrides)
            made.append(d)
            return d

        try:
            yield make
        finally:
            for d in made:
                pid = d.sup.state.pid
                if d.sup.final is None:
                    d.stop()
                if pid is not None and procs.group_members(pid):  # ours: end it
                    procs.signal_group(pid, signal.SIGKILL)
            for s, h in saved.items():
                signal.signal(s, h)


def test_foreign_gpu_holder_refuses_the_start(daemon: Callable[..., InProcess]) -> None:
    """NVML lists a process that is not ours on vLLM's GPU: with stale_holders: refuse the
    start is refused (vllm.start_blocked naming the pid) and vLLM is never spawned."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = daemon([FakeDevice(processes=[(holder.pid, 3 * GiB)])])
        blocked = d.wait_event("vllm.start_blocked")
        assert str(holder.pid) in str(blocked["reason"])
        assert d.events("gpu.foreign_holders") and not d.events("vllm.spawned")
        assert d.stop() == ExitCode.OK
    finally:
        holder.kill()
        holder.wait()


def test_not_resident_model_restarts_vllm(daemon: Callable[..., InProcess]) -> None:
    """After READY the floor is half of what the group held; when NVML shows the group
    holding less, vLLM is restarted with gpu.not_resident."""
    dev = FakeDevice()
    d = daemon([dev])
    d.wait_event("vllm.ready")
    pid = d.vllm_pid()
    dev.processes = [(pid, 40 * GiB)]
    floor = d.wait_event("gpu.residency")
    assert floor["min_resident"] == 20 * GiB and floor["pid"] == pid
    dev.processes = [(pid, 1 * GiB)]
    fault = d.wait_event("vllm.fault")
    assert fault["code"] == "gpu.not_resident"
    d.wait_event("restart.scheduled")
    dev.processes = []
    d.wait_event("vllm.ready", pid=d.new_pid(pid))
    assert d.stop() == ExitCode.OK


def test_lost_gpu_stops_vllm_and_exits_80(daemon: Callable[..., InProcess]) -> None:
    dev = FakeDevice()
    d = daemon([dev])
    d.wait_event("vllm.ready")
    pid = d.vllm_pid()
    dev.lost = True
    fatal = d.wait_event("gpu.fatal")
    assert fatal["class"] == "fatal"
    d.run_until(lambda: d.sup.final is not None)
    assert d.stop() == ExitCode.GPU_FATAL
    assert d.events("supervisor.gave_up")[0]["code"] == ExitCode.GPU_FATAL
    assert not procs.group_members(pid)


def test_xid_while_loading_restarts(daemon: Callable[..., InProcess]) -> None:
    """An application Xid from the event thread while vLLM is still loading: restart."""
    d = daemon(vllm={"env": {"STANDIN_LIST_DELAY_S": "30"}})
    d.wait_event("vllm.spawned")
    d.run_until(lambda: d.fake.registered)
    d.fake.inject_event(0, n.EVENT_XID_CRITICAL, 13)
    fault = d.wait_event("vllm.fault")
    assert fault["code"] == "xid.13"
    assert d.events("phase.changed")[-1]["from"] == "loading"
    assert d.stop() == ExitCode.OK


def test_reload_reaches_every_component(daemon: Callable[..., InProcess]) -> None:
    """Each section of a reload takes effect: health and restart in the policy, gpu in the
    GPU monitor (the bug this issue found), supervisor in the logging setup, and vllm by a
    restart of vLLM with the new command line."""
    d = daemon()
    d.wait_event("vllm.ready")
    old_pid = d.vllm_pid()
    cfg = yaml.safe_load(d.path.read_text())
    cfg["health"]["interval"] = "300ms"
    cfg["restart"]["max_restarts"] = 7
    cfg["gpu"].update(temperature_warn=70, stale_holders="report")
    cfg["supervisor"]["log_level"] = "info"
    cfg["vllm"]["args"] = {"max-model-len": 512}
    d.path.write_text(yaml.safe_dump(cfg))
    d.sup.post_signal(signal.SIGHUP)
    assert d.wait_event("supervisor.reloaded")["restart_vllm"] is True
    assert d.sup.policy.health.interval == 0.3 and d.sup.policy.restart.max_restarts == 7
    assert d.sup.gpu is not None
    mon = d.sup.gpu.monitor
    assert (mon.cfg.temperature_warn, mon.cfg.stale_holders) == (70, "report")
    assert d.logging[-1] == ("json", "info")
    spawned = d.wait_event("vllm.spawned", pid=d.new_pid(old_pid))
    assert "--max-model-len" in spawned["argv"]
    d.wait_event("vllm.ready", pid=spawned["pid"])
    assert d.stop() == ExitCode.OK
