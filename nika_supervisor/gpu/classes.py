"""GPU failure classes as data: what each NVML error, Xid and GPU condition means for vLLM.

Three classes, one documented policy each (POLICY). The supervisor acts on the class only;
the code, reason and hint go to STATUS and the journal unchanged.

Sources:
- [XID] NVIDIA Xid catalog, "Resolution Bucket (Immediate Action)" column (RESTART_APP,
  RESET_GPU, ...): https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html
- [K8S] NVIDIA k8s-device-plugin, internal/rm/health.go: `applicationErrorXids` 13, 31, 43,
  45, 68 are skipped as device-health signals ("Application errors: the GPU should still be
  healthy"); it registers XidCriticalError|DoubleBitEcc|SingleBitEcc masked by
  nvmlDeviceGetSupportedEventTypes and treats NVML_ERROR_TIMEOUT from the wait as "nothing".
- [NVML] NVML API Reference, nvmlReturn_t and nvmlEventSetWait:
  https://docs.nvidia.com/deploy/nvml-api/ (GPU_IS_LOST: "the GPU has fallen off the bus or
  has otherwise become inaccessible"; RESET_REQUIRED: "the GPU requires a reset before it can
  be used again"; LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch").
- [PR] NVIDIA dynamic page retirement: Xid 48 = DBE, 63 = page retired/row remap pending,
  64 = retirement failed: https://docs.nvidia.com/deploy/dynamic-page-retirement/
- Issue 5 (this project): the lists of application and reset-required Xids; on GB10 a
  restart loop has been seen to leak unified memory until a power cycle, which is why
  reset-class faults are fatal instead of retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from nika_supervisor.failures import Failure, Severity
from nika_supervisor.gpu import nvml as n


class FailureClass(StrEnum):
    RESTART = "restart"  # restart vLLM (backoff, restart budget)
    FATAL = "fatal"  # stop vLLM and exit 80 (GPU_FATAL): a human must reset/reboot
    WARN = "warn"  # log and show; vLLM keeps serving


POLICY: dict[FailureClass, str] = {
    FailureClass.RESTART: (
        "stop vLLM's process group and start it again, with backoff, within the restart "
        "budget (restart.max_restarts per restart.window)"),
    FailureClass.FATAL: (
        "stop vLLM, put the reason and the fix in STATUS and the journal (gpu.fatal), and exit "
        "80 (GPU_FATAL); the unit lists 80 in RestartPreventExitStatus, so nothing restarts "
        "into a sick GPU"),
    FailureClass.WARN: (
        "log gpu.finding at warning level and show it in STATUS; vLLM keeps serving"),
}


@dataclass(frozen=True, slots=True)
class GpuFinding:
    """One thing the GPU monitor found. `code` is stable (e.g. "xid.79", "nvml.gpu_lost")."""

    klass: FailureClass
    code: str
    reason: str
    hint: str
    device: int | None = None

    @property
    def failure(self) -> Failure:
        """In the one failure vocabulary (failures.py); SEVERITY maps the class."""
        return Failure(self.reason, self.hint, SEVERITY[self.klass], self.code, self.device)

    def fields(self) -> dict[str, object]:
        """For the `gpu.finding` / `gpu.fatal` log events."""
        return self.failure.fields()


SEVERITY: dict[FailureClass, Severity] = {
    FailureClass.WARN: Severity.WARN,
    FailureClass.RESTART: Severity.RETRY,
    FailureClass.FATAL: Severity.GPU_FATAL,
}


@dataclass(frozen=True, slots=True)
class Rule:
    klass: FailureClass
    what: str  # short description, {device} and named fields filled in by `finding`
    hint: str
    source: str  # where the classification comes from (see module docstring)


RESET_HINT = ("GPU needs reset/reboot: stop every GPU process and run `nvidia-smi -r -i "
              "{device}`, or reboot the host; check `journalctl -k | grep Xid`")
APP_HINT = ("vLLM's CUDA context crashed; the GPU itself should be healthy. If it repeats, "
            "look at `journalctl -k | grep Xid` and vLLM's log")

# Xids: the kernel driver's error codes, delivered through nvmlEventTypeXidCriticalError.
XID_TABLE: dict[int, Rule] = {
    # Application errors: [K8S] applicationErrorXids; [XID] bucket RESTART_APP.
    13: Rule(FailureClass.RESTART, "graphics engine exception", APP_HINT, "K8S, XID"),
    31: Rule(FailureClass.RESTART, "GPU memory page fault", APP_HINT, "K8S, XID"),
    43: Rule(FailureClass.RESTART, "GPU stopped processing", APP_HINT, "K8S, XID"),
    45: Rule(FailureClass.RESTART, "preemptive cleanup, due to previous errors", APP_HINT,
             "K8S, XID"),
    68: Rule(FailureClass.RESTART, "video processor exception", APP_HINT, "K8S, XID"),
    # Contained memory errors: the faulting context dies, the GPU goes on ([XID] RESTART_APP;
    # with row remapping, 48 is followed by 94 (contained) or 95 (uncontained)).
    48: Rule(FailureClass.RESTART, "double-bit ECC error",
             "if Xid 95 follows or it repeats, the GPU needs a reset", "PR, XID"),
    94: Rule(FailureClass.RESTART, "contained ECC error",
             "memory was remapped; reset the GPU at a convenient time to activate it", "XID"),
    # Informational memory maintenance: nothing is broken now.
    63: Rule(FailureClass.WARN, "ECC page retirement / row remapping recorded",
             "reset the GPU or reboot at a convenient time to activate the remapping", "PR, XID"),
    92: Rule(FailureClass.WARN, "high single-bit ECC error rate",
             "watch it; if it grows, plan a GPU replacement", "XID"),
    # Reset/reboot required: restarting vLLM cannot help and, on GB10, can leak unified memory.
    64: Rule(FailureClass.FATAL, "ECC page retirement or row remapping failed", RESET_HINT,
             "PR, XID, issue 5"),
    79: Rule(FailureClass.FATAL, "GPU has fallen off the bus",
             "GPU needs reset/reboot: reboot the host (a GPU off the bus rarely answers "
             "`nvidia-smi -r`); check power and PCIe seating if it repeats", "XID, issue 5"),
    95: Rule(FailureClass.FATAL, "uncontained ECC error", RESET_HINT, "XID, issue 5"),
    109: Rule(FailureClass.FATAL, "context switch timeout", RESET_HINT, "XID, issue 5"),
    119: Rule(FailureClass.FATAL, "GSP RPC timeout", RESET_HINT, "XID, issue 5"),
    120: Rule(FailureClass.FATAL, "GSP error", RESET_HINT, "XID, issue 5"),
    140: Rule(FailureClass.FATAL, "unrecovered ECC error", RESET_HINT, "XID, issue 5"),
    156: Rule(FailureClass.FATAL, "GPU reset required", RESET_HINT, "XID, issue 5"),
}
UNKNOWN_XID = Rule(FailureClass.WARN, "Xid {xid} (not in this supervisor's table)",
                   "look it up in the Xid catalog; if vLLM fails, the crash/health checks "
                   "restart it", "XID")

# NVML return codes met at runtime (and at init, see INIT_FATAL). NOT_SUPPORTED is absent on
# purpose: a missing capability (GB10 memory info) is not a failure.
NVML_FATAL: dict[int, tuple[str, Rule]] = {
    n.ERROR_GPU_IS_LOST: ("nvml.gpu_lost", Rule(
        FailureClass.FATAL, "GPU is lost (NVML_ERROR_GPU_IS_LOST: fallen off the bus or "
        "otherwise inaccessible)", XID_TABLE[79].hint, "NVML, issue 5")),
    n.ERROR_RESET_REQUIRED: ("nvml.reset_required", Rule(
        FailureClass.FATAL, "GPU requires a reset (NVML_ERROR_RESET_REQUIRED)", RESET_HINT,
        "NVML, issue 5")),
    n.ERROR_LIB_RM_VERSION_MISMATCH: ("nvml.version_mismatch", Rule(
        FailureClass.FATAL, "NVIDIA driver/library version mismatch "
        "(NVML_ERROR_LIB_RM_VERSION_MISMATCH)",
        "driver upgraded: reboot, so the new kernel module is loaded to match the new "
        "user-space libraries", "NVML, issue 5")),
}

# Conditions the monitor derives from readings, and NVML-level states.
CONDITIONS: dict[str, Rule] = {
    "nvml.unavailable": Rule(
        FailureClass.FATAL, "NVML is unavailable ({error}) and gpu.nvml is required",
        "check the driver: `nvidia-smi`; if it also fails, reinstall/load the driver or "
        "reboot; on a host without a GPU set gpu.nvml: optional or off", "issue 5"),
    "nvml.unavailable.optional": Rule(
        FailureClass.WARN, "NVML is unavailable ({error}); GPU checks are off, HTTP checks only",
        "set gpu.nvml: off to silence this on a host without an NVIDIA GPU", "issue 5"),
    "nvml.error": Rule(
        FailureClass.WARN, "NVML call failed at runtime ({error}); re-initialising NVML",
        "if it does not clear, check `nvidia-smi` and `journalctl -k`", "issue 5"),
    "nvml.recovered": Rule(
        FailureClass.RESTART, "NVML failed at runtime ({error}) and recovered on re-init; "
        "restarting vLLM so it gets a fresh CUDA context",
        "if this repeats, check `journalctl -k | grep -i -e Xid -e NVRM`", "issue 5"),
    "gpu.no_device": Rule(
        FailureClass.FATAL, "{what}",
        "check gpu.devices / CUDA_VISIBLE_DEVICES in vllm.env against `nvidia-smi -L`; a GPU "
        "missing from the list may have fallen off the bus (reboot)", "issue 5"),
    "gpu.temperature": Rule(
        FailureClass.WARN, "GPU {device} at {temperature}C (gpu.temperature_warn {limit:g}C)",
        "check cooling and airflow; the GPU will throttle and may shut down", "issue 5"),
    "gpu.throttle": Rule(
        FailureClass.WARN, "GPU {device} clocks held down: {reasons}",
        "thermal or power-brake slowdown: check cooling, power supply and "
        "`nvidia-smi -q -d PERFORMANCE`", "NVML (nvmlClocksEventReasons)"),
    "ecc.single_bit": Rule(
        FailureClass.WARN, "GPU {device}: {delta} new corrected (single-bit) ECC errors, "
        "{total} since driver load",
        "corrected by hardware; if the count keeps growing, plan maintenance", "issue 5"),
    "ecc.double_bit": Rule(
        FailureClass.RESTART, "GPU {device}: uncorrectable (double-bit) ECC error",
        XID_TABLE[48].hint, "PR"),
    "gpu.not_resident": Rule(
        FailureClass.RESTART, "model not resident: vLLM holds {resident} on its GPUs, below "
        "the {threshold} minimum (gpu.min_resident_memory)",
        "the weights were evicted or the engine lost its GPU context; vLLM is restarted",
        "issue 5"),
}


def xid_finding(xid: int, device: int | None) -> GpuFinding:
    """The finding for an Xid event on `device`."""
    rule = XID_TABLE.get(xid, UNKNOWN_XID)
    what = rule.what.format(xid=xid)
    where = f"GPU {device}: " if device is not None else ""
    return GpuFinding(rule.klass, f"xid.{xid}", f"{where}Xid {xid}: {what}",
                      rule.hint.format(device="" if device is None else device), device)


def nvml_fatal_finding(code: int, device: int | None) -> GpuFinding | None:
    """A FATAL finding for an NVML return code that no re-init can clear, else None."""
    entry = NVML_FATAL.get(code)
    if entry is None:
        return None
    name, rule = entry
    where = f"GPU {device}: " if device is not None else ""
    return GpuFinding(rule.klass, name, where + rule.what,
                      rule.hint.format(device="" if device is None else device), device)


def condition(code: str, device: int | None = None, **values: object) -> GpuFinding:
    """A finding for one of CONDITIONS, with its reason filled in from `values`."""
    rule = CONDITIONS[code]
    fill = {"device": "" if device is None else device, **values}
    public = code.removesuffix(".optional")
    return GpuFinding(rule.klass, public, rule.what.format(**fill), rule.hint.format(**fill),
                      device)
