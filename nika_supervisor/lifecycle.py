"""The policy's state, shaped by phase: one small record per phase, plus what outlives a vLLM.

`State.rec` holds only what the current phase means (a LOADING record has a pid and a spawn
time; a BACKOFF record has a wake time and nothing else), so no field is ever "None because
it does not apply". `Life` holds what spans vLLMs: the restart budget, the last failure, the
reload and GPU timers. Everything here is bounded: `restart_log` keeps the restarts inside
`restart.window` only, and at most `max_restarts` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from nika_supervisor.deep import DeepState
from nika_supervisor.failures import Failure
from nika_supervisor.states import Phase


class Then(StrEnum):
    """What follows STOPPING once the group is gone."""

    BACKOFF = "backoff"
    RESTART_NOW = "restart-now"  # a planned restart (reload): no backoff, no budget
    EXIT = "exit"
    WAIT = "wait"  # a cluster worker: wait for the head's next group (WAITING)


class Unset(StrEnum):
    UNSET = "unset"  # the residency floor has not been derived yet for this vLLM


UNSET = Unset.UNSET


@dataclass(frozen=True, slots=True)
class Starting:
    preflight_deadline: float = 0.0  # orphans still alive after this: give up on them
    wake_at: float | None = None  # re-run preflight (orphans were signalled)


@dataclass(frozen=True, slots=True)
class Loading:
    pid: int
    spawned_at: float
    next_probe_at: float
    probe_in_flight: bool = False
    probe_again: bool = False  # vLLM said it is up while a probe was out: probe again at once
    server_up_at: float | None = None  # when vLLM printed that its HTTP server is up
    answered: bool = False  # cluster head: the alias answered; READY waits for the group


@dataclass(frozen=True, slots=True)
class Serving:  # READY and UNHEALTHY
    pid: int
    spawned_at: float
    ready_at: float
    next_probe_at: float
    deep: DeepState
    failures: int = 0  # consecutive failed liveness probes
    residency: int | Unset | None = UNSET  # the floor, derived from the first sample


@dataclass(frozen=True, slots=True)
class Stopping:
    pid: int
    deadline: float  # SIGKILL at this time; after the kill, give up on the group
    then: Then
    exit_code: int = 0
    backoff_s: float = 0.0
    killed: bool = False
    child_exited: bool = False
    group_gone: bool = False
    next_group_check: float = 0.0
    draining: bool = False  # the gate finishes in-flight requests before vLLM is signalled


@dataclass(frozen=True, slots=True)
class Backoff:
    wake_at: float


@dataclass(frozen=True, slots=True)
class Done:  # FAILED and STOPPED
    exit_code: int


@dataclass(frozen=True, slots=True)
class Waiting:  # a cluster worker with no rank
    pass


Record = Starting | Loading | Serving | Stopping | Backoff | Done | Waiting

RECORD_OF: dict[Phase, type] = {
    Phase.STARTING: Starting, Phase.LOADING: Loading, Phase.READY: Serving,
    Phase.UNHEALTHY: Serving, Phase.STOPPING: Stopping, Phase.BACKOFF: Backoff,
    Phase.FAILED: Done, Phase.STOPPED: Done, Phase.WAITING: Waiting,
}


@dataclass(frozen=True, slots=True)
class Life:
    """What outlives one vLLM."""

    restarts: int = 0  # restarts since the daemon started (STATUS)
    restart_log: tuple[float, ...] = ()  # when each restart inside the window was decided
    attempt: int = 0  # backoff exponent; reset after a healthy stretch
    last_failure: Failure | None = None
    last_load_s: float | None = None  # how long the last load took (the gate's Retry-After)
    ever_ready: bool = False  # systemd has had READY=1 once: the start job is done
    reload_pending: bool = False  # a reload restarts vLLM: READY=1 when the new one answers
    config_error: str | None = None  # the last rejected reload, until a good one
    gpu: bool = False  # the GPU monitor runs
    next_gpu_sample: float = 0.0
    next_gpu_log: float = 0.0
    next_extend: float = 0.0
    dropped_lines: int = 0  # vLLM output lines the log pump dropped, since the daemon started
    logged_dropped: int = 0  # how many of them vllm.output_dropped has reported
    next_dropped_log: float = 0.0
    # A vLLM group across nodes (issue 12). group_ready: the group policy says the group is
    # formed (always True on a single node). rank_epoch: a worker's epoch to start its rank
    # for (from the head), None while it has none to start.
    group_ready: bool = True
    rank_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase = Phase.STARTING
    since: float = 0.0  # when the phase was entered
    rec: Record = field(default_factory=Starting)
    life: Life = field(default_factory=Life)

    @property
    def pid(self) -> int | None:
        """The current vLLM (its pid is also its process group id), if one runs."""
        rec = self.rec
        return rec.pid if isinstance(rec, Loading | Serving | Stopping) else None
