"""One failure vocabulary: what went wrong, how bad it is, and what giving up exits with.

The diagnoser (vLLM's output and exit status), the GPU classes (NVML, Xid), the probes and the
deep checks all describe a problem as a `Failure`. Its `severity` is the only thing the
policy acts on; `GIVE_UP_EXIT` is the one table from severity to the daemon's exit code.
Leaf module apart from exitcodes.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import StrEnum

from nika_supervisor.exitcodes import ExitCode


class Severity(StrEnum):
    WARN = "warn"  # log and show; vLLM keeps serving
    RETRY = "retry"  # restart vLLM, with backoff, within the restart budget
    MODEL = "model"  # deterministic: retrying cannot help; give up now (exit 79)
    GPU_FATAL = "gpu-fatal"  # the GPU or driver needs a human: give up now (exit 80)


# Severities that end the daemon at once, and with what. A spent restart budget exits
# BUDGET_SPENT_EXIT; a stop on request exits OK.
GIVE_UP_EXIT: dict[Severity, ExitCode] = {
    Severity.MODEL: ExitCode.MODEL_PROBLEM,
    Severity.GPU_FATAL: ExitCode.GPU_FATAL,
}
BUDGET_SPENT_EXIT = ExitCode.GAVE_UP


@dataclass(frozen=True, slots=True)
class Failure:
    """Why vLLM stopped serving (or must not start): STATUS, the state file, the journal."""

    cause: str
    hint: str = ""
    severity: Severity = Severity.RETRY
    code: str = ""  # a stable id: "exit", "health", "xid.79", a diagnosis signature id, ...
    device: int | None = None  # the GPU it is about, when it is about one

    def fields(self) -> dict[str, object]:
        """For the `gpu.finding` / `gpu.fatal` / `vllm.fault` log events."""
        return {"class": GPU_CLASS_NAME[self.severity], "code": self.code, "reason": self.cause,
                "hint": self.hint, "device": self.device}


# The names the GPU events have always used for the severities (a log contract).
GPU_CLASS_NAME = {Severity.WARN: "warn", Severity.RETRY: "restart", Severity.MODEL: "fatal",
                  Severity.GPU_FATAL: "fatal"}


def signal_name(sig: int | None) -> str | None:
    if sig is None:
        return None
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_exit(returncode: int | None, sig: int | None, loading: bool) -> str:
    when = "while loading" if loading else "while serving"
    if sig is not None:
        return f"killed by {signal_name(sig)} {when}"
    if returncode == 0:
        return f"exited with code 0 {when}, unrequested (vLLM exits 0 after its engine dies)"
    return f"exited with code {returncode} {when}"


def exit_hint(returncode: int | None, sig: int | None) -> str:
    if sig == signal.SIGKILL:
        return "SIGKILL that the supervisor did not send: the kernel's OOM killer? see dmesg"
    if sig == signal.SIGSEGV or sig == signal.SIGABRT:
        return "vLLM crashed; see its output above"
    return "see vLLM's output above (journalctl -u nika-vllm)"
