"""The supervisor's phases, and the groups the rest of the code asks about. Leaf module."""

from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"  # preflight: orphans, port, GPU holders; then spawn
    LOADING = "loading"  # vLLM runs; waiting for /v1/models to list the alias
    READY = "ready"  # the model answers; systemd has READY=1
    UNHEALTHY = "unhealthy"  # was ready; probes failing, below the threshold
    STOPPING = "stopping"  # the process group is being ended (for a restart or for good)
    BACKOFF = "backoff"  # waiting before the next start
    FAILED = "failed"  # gave up; the daemon is exiting non-zero
    STOPPED = "stopped"  # stopped on request; the daemon is exiting 0


# vLLM has (or may have) a live process group in these phases.
CHILD_PHASES = frozenset({Phase.LOADING, Phase.READY, Phase.UNHEALTHY, Phase.STOPPING})
# The model is answering in these phases (UNHEALTHY: it was, and has not failed enough yet).
SERVING_PHASES = frozenset({Phase.READY, Phase.UNHEALTHY})
# Nothing follows these phases but the daemon's exit.
TERMINAL_PHASES = frozenset({Phase.FAILED, Phase.STOPPED})
