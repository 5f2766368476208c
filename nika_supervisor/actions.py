"""What the policy asks the executor to do: the actions of `Policy.decide`.

An action that has an answer (Preflight, Spawn, Diagnose, LoadConfig, CheckGroup, SignalGroup)
is answered with an event that goes straight back into the policy. Leaf module of the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Work:
    """An HTTP call of the deep checks, for vLLM `pid`, run on the executor's pool."""

    kind: str  # "metrics" | "canary" | "speed"
    pid: int
    max_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Preflight:
    """Look for orphans of an earlier vLLM (signal them), a taken port, foreign GPU holders."""


@dataclass(frozen=True, slots=True)
class Spawn:
    pass


@dataclass(frozen=True, slots=True)
class SignalGroup:
    pgid: int
    sig: int


@dataclass(frozen=True, slots=True)
class Drain:
    """Ask the gate to stop admitting requests to vLLM `pid` and to report (Drained) when
    the ones in flight have finished."""

    pid: int
    timeout: float


@dataclass(frozen=True, slots=True)
class CheckGroup:
    """Is any process of the group left? Answered with GroupGone when none is."""

    pgid: int


@dataclass(frozen=True, slots=True)
class StartProbe:
    kind: str  # "ready" | "live"
    pid: int


@dataclass(frozen=True, slots=True)
class RunDeep:
    work: Work


@dataclass(frozen=True, slots=True)
class Diagnose:
    """Ask the diagnoser what vLLM's output says; answered with Diagnosed."""

    pid: int
    context: str  # "exit" | "engine_dead"
    returncode: int | None = None
    signal: int | None = None
    loading: bool = False
    reason: str = ""  # engine_dead: what the probe saw


@dataclass(frozen=True, slots=True)
class SampleGpu:
    pgid: int | None  # the vLLM group whose GPU memory counts as vLLM's


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Read the configuration file again; answered with ConfigLoaded or ConfigRejected."""


@dataclass(frozen=True, slots=True)
class ApplyConfig:
    """Make `cfg` the running configuration, in every component (the policy included)."""

    cfg: Any


@dataclass(frozen=True, slots=True)
class NotifyReady:
    pass


@dataclass(frozen=True, slots=True)
class NotifyReloading:
    pass


@dataclass(frozen=True, slots=True)
class NotifyStopping:
    pass


@dataclass(frozen=True, slots=True)
class ExtendTimeout:
    seconds: float


@dataclass(frozen=True, slots=True)
class Log:
    event: str
    level: str = "info"
    fields: tuple[tuple[str, object], ...] = ()

    def as_dict(self) -> dict[str, object]:
        return dict(self.fields)


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    restarts: int = field(default=0, compare=False)
    reason: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class RankStarted:
    """Cluster: tell the group policy this node's rank was spawned (worker: for `epoch`)."""

    epoch: int | None


@dataclass(frozen=True, slots=True)
class RankGone:
    """Cluster: tell the group policy this node's rank ended or failed, and why."""

    cause: str
    epoch: int | None  # a worker's: the epoch it was started for; the head's: None (current)


@dataclass(frozen=True, slots=True)
class AliasAnswered:
    """Cluster head: tell the group policy the alias answered (READY waits for the group)."""


Action = (
    Preflight | Spawn | SignalGroup | Drain | CheckGroup | StartProbe | RunDeep | Diagnose
    | SampleGpu | LoadConfig | ApplyConfig | NotifyReady | NotifyReloading | NotifyStopping
    | ExtendTimeout | Log | Exit | RankStarted | RankGone | AliasAnswered
)


def log(event: str, level: str = "info", **fields: object) -> Log:
    return Log(event, level, tuple(fields.items()))


def log_fields(event: str, level: str, fields: dict[str, object]) -> Log:
    return Log(event, level, tuple(fields.items()))
