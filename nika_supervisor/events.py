"""What happens, as the executor tells the policy: the events of `Policy.decide`.

Each is a plain frozen value. The executor makes them from I/O (a signal, an exit, a probe
result, an output line, an NVML reading) and from the results of actions it was asked to
perform (Preflight -> PreflightResult, Spawn -> Spawned, ...). Leaf module of the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nika_supervisor.actions import Diagnose
from nika_supervisor.failures import Failure
from nika_supervisor.metrics import VllmMetrics
from nika_supervisor.probes import Generation

if TYPE_CHECKING:
    from nika_supervisor.config import Config


@dataclass(frozen=True, slots=True)
class Boot:
    gpu: bool = False  # the GPU monitor is running (gpu.sample, residency, GPU findings)
    gpu_finding: Failure | None = None  # what starting NVML found, if anything
    gate_failure: Failure | None = None  # the gate could not bind its public addresses
    # The cluster agent could not start: no token (code cluster.token), or its control
    # address cannot be bound (cluster.bind).
    cluster_failure: Failure | None = None
    # The restart budget read back from the history (a crash loop slows down across daemon
    # restarts): restart times on this clock, the backoff exponent, the backoff still owed.
    restart_log: tuple[float, ...] = ()
    attempt: int = 0
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. The executor sends one at every deadline `next_deadline()` names."""


@dataclass(frozen=True, slots=True)
class PreflightResult:
    orphans_pending: bool = False  # processes of an earlier vLLM were signalled and still live
    blocked: Failure | None = None  # the start must not happen (port taken, foreign GPU holder)


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    failure: Failure


@dataclass(frozen=True, slots=True)
class ServerUp:
    """vLLM printed that its HTTP server is up: probe for readiness now, not at the next poll."""

    pid: int


@dataclass(frozen=True, slots=True)
class ReadyProbe:
    pid: int
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class LiveProbe:
    pid: int
    ok: bool
    engine_dead: bool = False
    reason: str = ""
    probe: str = "health"


@dataclass(frozen=True, slots=True)
class ChildExited:
    pid: int
    returncode: int | None
    signal: int | None


@dataclass(frozen=True, slots=True)
class Diagnosed:
    """The answer to a Diagnose action: what vLLM's output says (None: nothing known)."""

    ask: Diagnose
    failure: Failure | None


@dataclass(frozen=True, slots=True)
class GroupGone:
    """No process of the process group `pgid` is left."""

    pgid: int


@dataclass(frozen=True, slots=True)
class GpuReport:
    """A GPU finding outside a sample: NVML start, the Xid event thread."""

    failure: Failure


@dataclass(frozen=True, slots=True)
class GpuSampled:
    """One GPU sampling pass: what vLLM's group holds and what the pass found."""

    pid: int | None  # the vLLM group sampled (None: none was running)
    resident_bytes: int | None  # None: unknown (NVML down or unsupported)
    findings: tuple[Failure, ...] = ()
    fields: Mapping[str, object] = field(default_factory=dict)  # for gpu.sample


@dataclass(frozen=True, slots=True)
class MetricsRead:
    pid: int
    metrics: VllmMetrics | None  # None: /metrics could not be read


@dataclass(frozen=True, slots=True)
class Generated:
    pid: int
    purpose: str  # "canary" | "speed"
    result: Generation
    env: Mapping[str, str] = field(default_factory=dict)  # what vLLM was started with
    args: Mapping[str, object] = field(default_factory=dict)  # vllm.args


@dataclass(frozen=True, slots=True)
class OutputDropped:
    """The log pump dropped vLLM output lines (a stuck journald)."""

    pid: int
    count: int  # lines dropped since the last report


@dataclass(frozen=True, slots=True)
class LoadStalled:
    """vLLM's loading lines showed no new shard or step for health.load_stall. It is about
    the current load: the Observer starts a new one at every spawn."""

    failure: Failure


@dataclass(frozen=True, slots=True)
class Drained:
    """The gate has no request in flight to the current vLLM any more (or gave up waiting)."""

    in_flight_left: int = 0
    waited_s: float = 0.0
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class StopRequested:
    signal: str = "SIGTERM"


@dataclass(frozen=True, slots=True)
class RestartRequested:
    reason: str


@dataclass(frozen=True, slots=True)
class ReloadRequested:
    """SIGHUP: read the configuration file again."""

    signal: str = "SIGHUP"


@dataclass(frozen=True, slots=True)
class ConfigLoaded:
    cfg: Config | Any
    launch_changed: bool  # vLLM's command line or environment differs: restart it


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GroupFailed:
    """Cluster head: the group policy restarts the group (a rank died, hung, was lost)."""

    failure: Failure
    rank: int


@dataclass(frozen=True, slots=True)
class RankStart:
    """Cluster worker: the head's group `epoch` is starting; start this node's rank for it."""

    epoch: int


@dataclass(frozen=True, slots=True)
class RankStop:
    """Cluster worker: the group this node's rank belonged to is gone; stop the rank."""

    cause: str


@dataclass(frozen=True, slots=True)
class GroupReady:
    """The group policy's READY changed (head: every rank joined and the alias answers;
    worker: its rank is in the head's READY epoch)."""

    ready: bool
    reason: str


Event = (
    Boot | Tick | PreflightResult | Spawned | SpawnFailed | ServerUp | ReadyProbe | LiveProbe
    | ChildExited | Diagnosed | GroupGone | GpuReport | GpuSampled | MetricsRead | Generated
    | OutputDropped | LoadStalled | Drained | StopRequested | RestartRequested
    | ReloadRequested | ConfigLoaded | ConfigRejected | GroupFailed | RankStart | RankStop
    | GroupReady
)
