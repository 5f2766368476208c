"""The executor's adapter to the GPU monitor: NVML readings in, policy events out.

It starts and stops the monitor, turns a sampling pass into a `GpuSampled` event (what vLLM's
process group holds, what the pass found) and the event thread's findings into `GpuReport`,
and answers the preflight question about foreign GPU holders. What a finding means is decided
by the policy, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nika_supervisor import procs
from nika_supervisor.config import GpuConfig
from nika_supervisor.events import GpuReport, GpuSampled
from nika_supervisor.failures import Failure
from nika_supervisor.gpu import GpuFinding, GpuMonitor, GpuSample

MonitorFactory = Callable[..., GpuMonitor]


class GpuWatch:
    def __init__(self, cfg: GpuConfig, vllm_env: Mapping[str, str],
                 emit: Callable[[GpuReport], None], log: Any,
                 factory: MonitorFactory = GpuMonitor) -> None:
        self.log = log
        self.monitor = factory(cfg, vllm_env=vllm_env,
                               emit=lambda f: emit(GpuReport(f.failure)), log=log)
        self.last: GpuSample | None = None

    def start(self) -> tuple[bool, Failure | None]:
        """(runs, what starting NVML found). An optional NVML that is unavailable leaves the
        daemon on HTTP checks alone: runs is False and the monitor is closed."""
        finding: GpuFinding | None = self.monitor.start()
        m = self.monitor
        self.log.info("gpu.started", nvml=m.cfg.nvml, state=str(m.state),
                      devices=list(m.devices), events=m.events_supported)
        runs = m.state != "off"
        if not runs:
            m.close()
        return runs, None if finding is None else finding.failure

    def configure(self, cfg: GpuConfig, vllm_env: Mapping[str, str]) -> None:
        self.monitor.configure(cfg, vllm_env)

    def sample(self, pgid: int | None, now: float) -> GpuSampled:
        pids = [p.pid for p in procs.group_members(pgid)] if pgid is not None else []
        s = self.monitor.sample(pids, now)
        self.last = s
        return GpuSampled(pgid, s.vllm_resident_bytes, tuple(f.failure for f in s.findings),
                          s.fields())

    def refusal(self, marker_key: str, marker_value: str) -> Failure | None:
        """Foreign processes on vLLM's GPUs (gpu.stale_holders decides whether they block)."""
        pf = self.monitor.preflight(marker_key, marker_value, own_pgid=None)
        if pf.foreign:
            self.log.warning("gpu.foreign_holders", holders=[h.describe() for h in pf.foreign],
                             refused=pf.refuse_reason is not None)
        if not pf.refuse_reason:
            return None
        return Failure(pf.refuse_reason, "end those processes, or set gpu.stale_holders: report",
                       code="gpu.foreign_holders")

    def status_text(self) -> str:
        return self.last.status_text() if self.last is not None else ""

    def close(self) -> None:
        self.monitor.close()
