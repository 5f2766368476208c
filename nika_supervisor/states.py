"""The supervisor's phases, the groups the rest of the code asks about, and the table of
allowed moves between phases (`check_move` asserts every transition against it). Leaf module.
"""

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
    WAITING = "waiting"  # a cluster worker with no rank: waiting for the head's group to start


# vLLM has a live process group in these phases.
CHILD_PHASES = frozenset({Phase.LOADING, Phase.READY, Phase.UNHEALTHY, Phase.STOPPING})
# vLLM runs and is not being stopped: a fault or a restart request is about it.
RUNNING_PHASES = frozenset({Phase.LOADING, Phase.READY, Phase.UNHEALTHY})
# The model is answering in these phases (UNHEALTHY: it was, and has not failed enough yet).
SERVING_PHASES = frozenset({Phase.READY, Phase.UNHEALTHY})
# Nothing follows these phases but the daemon's exit.
TERMINAL_PHASES = frozenset({Phase.FAILED, Phase.STOPPED})

# Every move the policy may make. STARTING -> FAILED/STOPPED/BACKOFF: a start refused before
# any process exists (a foreign GPU holder, a fatal GPU at boot, a stop during preflight).
# WAITING is a cluster worker's only: it starts its rank when the head's group starts
# (STARTING), and goes back to WAITING when its rank stops or fails (the head restarts the
# group; a worker has no backoff of its own).
ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.LOADING, Phase.BACKOFF, Phase.WAITING, Phase.FAILED,
                               Phase.STOPPED}),
    Phase.LOADING: frozenset({Phase.READY, Phase.STOPPING}),
    Phase.READY: frozenset({Phase.UNHEALTHY, Phase.STOPPING}),
    Phase.UNHEALTHY: frozenset({Phase.READY, Phase.STOPPING}),
    Phase.STOPPING: frozenset({Phase.BACKOFF, Phase.STARTING, Phase.WAITING, Phase.FAILED,
                               Phase.STOPPED}),
    Phase.WAITING: frozenset({Phase.STARTING, Phase.FAILED, Phase.STOPPED}),
    Phase.BACKOFF: frozenset({Phase.STARTING, Phase.FAILED, Phase.STOPPED}),
    Phase.FAILED: frozenset(),
    Phase.STOPPED: frozenset(),
}


class IllegalMove(AssertionError):
    pass


def check_move(old: Phase, new: Phase, reason: str) -> None:
    if new not in ALLOWED[old]:
        raise IllegalMove(f"{old} -> {new} is not an allowed move ({reason})")
