"""The documented exit codes. A contract: other tools and the systemd unit rely on them.

Leaf module: imports nothing from the package.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # stopped on request
    INTERNAL = 1  # unexpected internal error (systemd restarts)
    USAGE = 2  # command-line usage error
    NOT_READY = 3  # `status`: the server is not ready
    NO_STATE = 4  # `status`: no state file, the daemon is not running
    GAVE_UP = 69  # EX_UNAVAILABLE: restart budget exhausted (systemd restarts, StartLimit* applies)
    CONFIG = 78  # EX_CONFIG: invalid configuration (RestartPreventExitStatus)
    # deterministic vLLM failure: bad flag, missing model, arch (RestartPreventExitStatus)
    MODEL_PROBLEM = 79
    # GPU lost, reset required, driver mismatch, NVML required (RestartPreventExitStatus)
    GPU_FATAL = 80
