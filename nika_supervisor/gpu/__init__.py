"""GPU health through NVML: the monitor, failure classes, residency and GPU holders.

The supervisor uses exactly this API (see README.md, GPU health for the operator's view):

    mon = GpuMonitor(cfg.gpu, vllm_env=cfg.vllm.env_dict, emit=queue.put)
    finding = mon.start()                      # None | FATAL | WARN
    sample = mon.sample(vllm_pids)             # GpuSample: readings, resident bytes, findings
    pf = mon.preflight(marker_key, marker_value, own_pgid=None)   # stale / foreign holders
    mon.close()
    residency_threshold(configured, held_at_ready); check_residency(threshold, resident)
"""

from nika_supervisor.gpu.classes import POLICY, FailureClass, GpuFinding
from nika_supervisor.gpu.holders import Holder, Preflight
from nika_supervisor.gpu.monitor import GpuMonitor, NvmlState
from nika_supervisor.gpu.nvml import Nvml, NvmlError
from nika_supervisor.gpu.residency import check_residency, residency_threshold
from nika_supervisor.gpu.sample import DeviceReading, GpuSample

__all__ = [
    "POLICY", "DeviceReading", "FailureClass", "GpuFinding", "GpuMonitor", "GpuSample", "Holder",
    "Nvml", "NvmlError", "NvmlState", "Preflight", "check_residency", "residency_threshold",
]
