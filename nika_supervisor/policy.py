"""The pure decision core: `Policy.decide(state, event, now) -> (state, actions)`.

Nothing here touches a process, a socket or a clock. The executor (`supervisor.py`) turns
what happens into events, feeds them in with the current monotonic time, and carries out the
returned actions. Tests replay scripted histories and assert the exact transitions.

The life of one vLLM:

    STARTING --Spawned--> LOADING --ready probe ok--> READY <--probe ok-- UNHEALTHY
        ^                    |                          |  \\--probe failed--^
        |                    '--exit / fault / timeout--+--exit / fault / threshold--.
        |                                                                            v
    BACKOFF <------------------------- (restart budget left) ------------------ STOPPING
                                        (budget spent / fatal) --> FAILED        (group gone)
                                        (stop requested)       --> STOPPED

Every failure goes through STOPPING, so no restart starts while any process of the old group
is alive: vLLM's EngineCore and Workers outlive a SIGKILLed API server (issue 2, step 5).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from nika_supervisor.config import HealthConfig, RestartConfig
from nika_supervisor.durations import format_duration
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.states import Phase

READY_POLL_S = 0.25  # readiness poll while loading; bounds the ready lag
PREFLIGHT_RETRY_S = 0.1  # re-check for orphans this often while they die
KILL_GRACE_S = 5.0  # after SIGKILL, how long the group gets to disappear


class Severity(StrEnum):
    RETRY = "retry"  # restart vLLM, with backoff, within the restart budget
    MODEL = "model"  # deterministic: retrying cannot help; give up now (exit 79)
    GPU_FATAL = "gpu-fatal"  # the GPU or driver needs a human: give up now (exit 80)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the last vLLM stopped serving: shown in STATUS, the state file and the journal."""

    cause: str
    hint: str = ""
    severity: Severity = Severity.RETRY
    code: str = ""  # a stable id: "exit", "health", "xid.79", a diagnosis signature id, ...


class Then(StrEnum):
    """What follows STOPPING once the group is gone."""

    BACKOFF = "backoff"
    RESTART_NOW = "restart-now"  # a planned restart (reload): no backoff, no budget
    EXIT = "exit"


# ------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Boot:
    pass


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
    diagnosis: Failure | None = None  # what vLLM's output says, when the engine is dead


@dataclass(frozen=True, slots=True)
class ChildExited:
    pid: int
    returncode: int | None
    signal: int | None
    diagnosis: Failure | None = None


@dataclass(frozen=True, slots=True)
class GroupGone:
    """No process of the current child's process group is left."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A watcher (GPU, stall rule, canary, residency) says the serving vLLM is broken."""

    failure: Failure


@dataclass(frozen=True, slots=True)
class StopRequested:
    pass


@dataclass(frozen=True, slots=True)
class RestartRequested:
    reason: str


Event = (
    Boot | Tick | PreflightResult | Spawned | SpawnFailed | ReadyProbe | LiveProbe | ChildExited
    | GroupGone | Fault | StopRequested | RestartRequested
)

# ----------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Preflight:
    pass


@dataclass(frozen=True, slots=True)
class Spawn:
    pass


@dataclass(frozen=True, slots=True)
class SignalGroup:
    sig: int


@dataclass(frozen=True, slots=True)
class StartProbe:
    kind: str  # "ready" | "live"
    pid: int


@dataclass(frozen=True, slots=True)
class NotifyReady:
    pass


@dataclass(frozen=True, slots=True)
class NotifyStopping:
    pass


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


Action = (
    Preflight | Spawn | SignalGroup | StartProbe | NotifyReady | NotifyStopping | Log | Exit
)


def log(event: str, level: str = "info", **fields: object) -> Log:
    return Log(event, level, tuple(fields.items()))


# ------------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase = Phase.STARTING
    since: float = 0.0  # when the phase was entered
    pid: int | None = None  # the current vLLM (its pid is also its process group id)
    spawned_at: float | None = None
    ready_at: float | None = None  # when the current vLLM became ready
    failures: int = 0  # consecutive failed liveness probes
    next_probe_at: float | None = None
    ready_probe_in_flight: bool = False
    restarts: int = 0  # restarts since the daemon started (STATUS)
    restart_log: tuple[float, ...] = ()  # when each restart in the window was decided
    attempt: int = 0  # backoff exponent; reset after a healthy stretch
    wake_at: float | None = None  # BACKOFF: start again; STARTING: re-run preflight
    stop_deadline: float | None = None
    killed: bool = False
    child_exited: bool = True
    group_gone: bool = True
    then: Then = Then.BACKOFF
    exit_code: int = ExitCode.OK
    backoff_s: float = 0.0
    preflight_deadline: float | None = None
    last_failure: Failure | None = None
    transitions: tuple[tuple[Phase, Phase, str], ...] = field(default=(), compare=False)


# ------------------------------------------------------------------------------------ policy


def backoff_delay(cfg: RestartConfig, attempt: int, jitter: float) -> float:
    """Capped exponential backoff with up to 20 % jitter taken off (stamina's shape).

    jitter is a draw from [0, 1); the result stays within [0.8, 1.0] of the capped value.
    """
    base = min(cfg.backoff_max, cfg.backoff_initial * (2.0 ** min(attempt, 32)))
    return base * (1.0 - 0.2 * jitter)


@dataclass(frozen=True, slots=True)
class Policy:
    health: HealthConfig
    restart: RestartConfig
    jitter: Callable[[], float] = field(default=lambda: 0.5)

    # -- helpers --------------------------------------------------------------------------

    def _goto(self, s: State, phase: Phase, now: float, reason: str, acts: list[Action]) -> State:
        if phase == s.phase:
            raise AssertionError(f"no-op transition {phase} -> {phase} ({reason})")
        acts.append(log("phase.changed", "info", **{"from": str(s.phase), "to": str(phase),
                                                      "reason": reason}))
        return replace(s, phase=phase, since=now,
                       transitions=(*s.transitions, (s.phase, phase, reason)))

    def _start(self, s: State, now: float, reason: str, acts: list[Action]) -> State:
        s = self._goto(s, Phase.STARTING, now, reason, acts)
        acts.append(Preflight())
        return replace(s, wake_at=None, preflight_deadline=now + self.restart.stop_timeout)

    def _stop(self, s: State, now: float, then: Then, code: int, reason: str,
              acts: list[Action]) -> State:
        """Begin ending the current group (or, with none, go straight to what follows)."""
        s = replace(s, then=then, exit_code=code)
        if s.pid is None or (s.child_exited and s.group_gone):
            return self._after_stop(s, now, reason, acts)
        if s.phase != Phase.STOPPING:
            s = self._goto(s, Phase.STOPPING, now, reason, acts)
            acts.append(SignalGroup(signal.SIGTERM))
            s = replace(s, stop_deadline=now + self.restart.stop_timeout, killed=False)
        return s

    def _after_stop(self, s: State, now: float, reason: str, acts: list[Action]) -> State:
        s = replace(s, pid=None, spawned_at=None, ready_at=None, stop_deadline=None,
                    next_probe_at=None, ready_probe_in_flight=False, failures=0)
        if s.then is Then.EXIT:
            final = Phase.STOPPED if s.exit_code == ExitCode.OK else Phase.FAILED
            s = self._goto(s, final, now, reason, acts)
            acts.append(Exit(s.exit_code))
            return s
        if s.then is Then.RESTART_NOW:
            return self._start(s, now, reason, acts)
        s = self._goto(s, Phase.BACKOFF, now, reason, acts)
        return replace(s, wake_at=now + s.backoff_s)

    def _fail(self, s: State, now: float, failure: Failure, acts: list[Action]) -> State:
        """A failure of the current vLLM: decide between a restart and giving up, then stop."""
        s = replace(s, last_failure=failure)
        if failure.severity is Severity.MODEL:
            acts.append(log("supervisor.gave_up", "error", reason=failure.cause,
                            hint=failure.hint, code=int(ExitCode.MODEL_PROBLEM)))
            return self._stop(s, now, Then.EXIT, ExitCode.MODEL_PROBLEM, failure.cause, acts)
        if failure.severity is Severity.GPU_FATAL:
            acts.append(log("supervisor.gave_up", "critical", reason=failure.cause,
                            hint=failure.hint, code=int(ExitCode.GPU_FATAL)))
            return self._stop(s, now, Then.EXIT, ExitCode.GPU_FATAL, failure.cause, acts)
        recent = tuple(t for t in s.restart_log if now - t < self.restart.window)
        if len(recent) >= self.restart.max_restarts:
            why = (f"{len(recent) + 1} failures within {format_duration(self.restart.window)} "
                   f"(max_restarts={self.restart.max_restarts}); last: {failure.cause}")
            s = replace(s, last_failure=replace(failure, cause=f"gave up: {why}"))
            acts.append(log("supervisor.gave_up", "error", reason=why, hint=failure.hint,
                            code=int(ExitCode.GAVE_UP)))
            return self._stop(s, now, Then.EXIT, ExitCode.GAVE_UP, failure.cause, acts)
        delay = backoff_delay(self.restart, s.attempt, self.jitter())
        s = replace(s, restart_log=(*recent, now), restarts=s.restarts + 1,
                    attempt=s.attempt + 1, backoff_s=delay)
        acts.append(log("restart.scheduled", "warning", delay_s=round(delay, 3),
                        attempt=s.attempt, restarts_in_window=len(recent) + 1,
                        reason=failure.cause))
        return self._stop(s, now, Then.BACKOFF, ExitCode.OK, failure.cause, acts)

    # -- the core ------------------------------------------------------------------------

    def decide(self, s: State, ev: Event, now: float) -> tuple[State, list[Action]]:
        acts: list[Action] = []
        s = self._decide(s, ev, now, acts)
        return s, acts

    def _decide(self, s: State, ev: Event, now: float, acts: list[Action]) -> State:
        p = s.phase
        match ev:
            case Boot():
                acts.append(Preflight())
                return replace(s, since=now, preflight_deadline=now + self.restart.stop_timeout)

            case StopRequested():
                acts.append(NotifyStopping())
                if p in (Phase.STOPPED, Phase.FAILED):
                    return s
                if p is Phase.STOPPING:
                    return replace(s, then=Then.EXIT, exit_code=ExitCode.OK)
                return self._stop(s, now, Then.EXIT, ExitCode.OK, "stop requested", acts)

            case RestartRequested(reason=reason):
                if p in (Phase.LOADING, Phase.READY, Phase.UNHEALTHY):
                    return self._stop(s, now, Then.RESTART_NOW, ExitCode.OK, reason, acts)
                if p is Phase.BACKOFF:
                    return self._start(s, now, reason, acts)
                if p is Phase.STOPPING and s.then is Then.BACKOFF:
                    return replace(s, then=Then.RESTART_NOW)
                return s  # STARTING picks the new config up at spawn; terminal phases ignore

            case Tick():
                return self._tick(s, now, acts)

            case PreflightResult() if p is Phase.STARTING:
                if ev.blocked is not None:
                    acts.append(log("vllm.start_blocked", "error", reason=ev.blocked.cause,
                                    hint=ev.blocked.hint))
                    return self._fail(replace(s, pid=None), now, ev.blocked, acts)
                if ev.orphans_pending:
                    if s.preflight_deadline is not None and now >= s.preflight_deadline:
                        f = Failure("processes of an earlier vLLM survive SIGKILL",
                                    "look for processes in D state (GPU driver hang); "
                                    "a reboot may be needed", code="orphans")
                        return self._fail(s, now, f, acts)
                    return replace(s, wake_at=now + PREFLIGHT_RETRY_S)
                acts.append(Spawn())
                return replace(s, wake_at=None)

            case Spawned(pid=pid) if p is Phase.STARTING:
                s = replace(s, pid=pid, spawned_at=now, child_exited=False, group_gone=False,
                            next_probe_at=now, ready_probe_in_flight=False, failures=0)
                return self._goto(s, Phase.LOADING, now, "spawned", acts)

            case SpawnFailed(failure=failure) if p is Phase.STARTING:
                acts.append(log("vllm.spawn_failed", "error", reason=failure.cause,
                                hint=failure.hint))
                return self._fail(s, now, failure, acts)

            case ReadyProbe(pid=pid) if pid == s.pid and p is Phase.LOADING:
                s = replace(s, ready_probe_in_flight=False)
                if not ev.ok:
                    return replace(s, next_probe_at=now + READY_POLL_S)
                load_s = now - (s.spawned_at or now)
                acts.append(log("vllm.ready", pid=pid, load_s=round(load_s, 3),
                                restarts=s.restarts))
                acts.append(NotifyReady())
                s = replace(s, ready_at=now, failures=0, next_probe_at=now + self.health.interval)
                return self._goto(s, Phase.READY, now, "model listed", acts)

            case ReadyProbe():
                return replace(s, ready_probe_in_flight=False) if ev.pid == s.pid else s

            case LiveProbe(pid=pid) if pid == s.pid and p in (Phase.READY, Phase.UNHEALTHY):
                return self._live(s, ev, now, acts)

            case ChildExited(pid=pid) if pid == s.pid:
                return self._exited(s, ev, now, acts)

            case GroupGone() if s.pid is not None:
                s = replace(s, group_gone=True)
                if p is Phase.STOPPING and s.child_exited:
                    return self._after_stop(s, now, "process group gone", acts)
                return s

            case Fault(failure=failure) if s.pid is not None and p is not Phase.STOPPING:
                acts.append(log("vllm.fault", "error", reason=failure.cause, hint=failure.hint,
                                code=failure.code))
                return self._fail(s, now, failure, acts)

            case Fault(failure=failure) if failure.severity is not Severity.RETRY:
                # Fatal GPU findings matter even with no vLLM running (e.g. during BACKOFF).
                if p in (Phase.STOPPED, Phase.FAILED):
                    return s
                if p is Phase.STOPPING:
                    code = (ExitCode.GPU_FATAL if failure.severity is Severity.GPU_FATAL
                            else ExitCode.MODEL_PROBLEM)
                    acts.append(log("supervisor.gave_up", "critical", reason=failure.cause,
                                    hint=failure.hint, code=int(code)))
                    return replace(s, then=Then.EXIT, exit_code=code, last_failure=failure)
                return self._fail(s, now, failure, acts)

        return s  # stale or irrelevant: probe results for an old pid, duplicate events

    def _tick(self, s: State, now: float, acts: list[Action]) -> State:
        p = s.phase
        if p is Phase.STARTING and s.wake_at is not None and now >= s.wake_at:
            acts.append(Preflight())
            return replace(s, wake_at=None)
        if p is Phase.BACKOFF and s.wake_at is not None and now >= s.wake_at:
            return self._start(s, now, "backoff elapsed", acts)
        if p is Phase.LOADING:
            assert s.spawned_at is not None and s.pid is not None
            if now - s.spawned_at >= self.health.startup_timeout:
                f = Failure(f"not ready after {format_duration(self.health.startup_timeout)} "
                            "(health.startup_timeout)",
                            "raise health.startup_timeout if the model loads slowly; "
                            "otherwise see vLLM's output above", code="startup_timeout")
                return self._fail(s, now, f, acts)
            if (not s.ready_probe_in_flight and s.next_probe_at is not None
                    and now >= s.next_probe_at):
                acts.append(StartProbe("ready", s.pid))
                return replace(s, ready_probe_in_flight=True)
            return s
        if p in (Phase.READY, Phase.UNHEALTHY):
            pid, due = s.pid, s.next_probe_at
            assert pid is not None and due is not None
            healthy_s = now - s.ready_at if s.ready_at is not None else 0.0
            if s.attempt and healthy_s >= self.restart.healthy_after:
                acts.append(log("restart.backoff_reset", healthy_s=round(healthy_s, 1)))
                s = replace(s, attempt=0)
            if now >= due:
                acts.append(StartProbe("live", pid))
                # Keep the cadence (probes may overlap when each waits for its timeout), but
                # never schedule into the past after the loop itself was held up.
                nxt = due + self.health.interval
                return replace(s, next_probe_at=nxt if nxt > now else now + self.health.interval)
            return s
        if p is Phase.STOPPING and s.stop_deadline is not None and now >= s.stop_deadline:
            if not s.killed:
                acts.append(log("vllm.stop_timeout", "warning", pid=s.pid,
                                stop_timeout_s=self.restart.stop_timeout))
                acts.append(SignalGroup(signal.SIGKILL))
                return replace(s, killed=True, stop_deadline=now + KILL_GRACE_S)
            acts.append(log("vllm.unkillable", "critical", pid=s.pid,
                            hint="processes survive SIGKILL: a GPU driver hang? a reboot may "
                                 "be needed"))
            return self._after_stop(replace(s, group_gone=True, child_exited=True), now,
                                    "group survives SIGKILL", acts)
        return s

    def _live(self, s: State, ev: LiveProbe, now: float, acts: list[Action]) -> State:
        if ev.ok:
            if s.phase is Phase.UNHEALTHY:
                acts.append(log("health.recovered", after_failures=s.failures))
                s = self._goto(s, Phase.READY, now, "probe ok", acts)
            return replace(s, failures=0)
        if ev.engine_dead:
            acts.append(log("health.failed", "error", probe=ev.probe, reason=ev.reason,
                            consecutive=s.failures + 1, engine_dead=True))
            d = ev.diagnosis
            f = (replace(d, cause=f"engine dead ({ev.reason}): {d.cause}") if d is not None
                 else Failure(f"engine dead: {ev.reason}",
                              "vLLM's engine died; see its output above", code="engine_dead"))
            return self._fail(s, now, f, acts)
        failures = s.failures + 1
        acts.append(log("health.failed", "warning", probe=ev.probe, reason=ev.reason,
                        consecutive=failures, threshold=self.health.failure_threshold))
        s = replace(s, failures=failures)
        if failures >= self.health.failure_threshold:
            f = Failure(f"unresponsive: {failures} failed probes, last: {ev.reason}",
                        "a hung or overloaded server; see vLLM's output above", code="health")
            return self._fail(s, now, f, acts)
        if s.phase is Phase.READY:
            s = self._goto(s, Phase.UNHEALTHY, now, f"probe failed: {ev.reason}", acts)
        return s

    def _exited(self, s: State, ev: ChildExited, now: float, acts: list[Action]) -> State:
        requested = s.phase is Phase.STOPPING
        failure = ev.diagnosis or Failure(describe_exit(ev.returncode, ev.signal, s.phase),
                                          exit_hint(ev.returncode, ev.signal), code="exit")
        level = "info" if requested else "error"
        acts.append(log("vllm.exited", level, pid=ev.pid, returncode=ev.returncode,
                        signal=signal_name(ev.signal), requested=requested,
                        cause=None if requested else failure.cause,
                        hint=None if requested else failure.hint,
                        diagnosis=None if requested else failure.code,
                        phase=str(s.phase)))
        s = replace(s, child_exited=True)
        if requested:
            if s.group_gone:
                return self._after_stop(s, now, "vLLM exited", acts)
            return s
        return self._fail(s, now, failure, acts)

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self, s: State) -> float | None:
        """The earliest monotonic time at which `decide(s, Tick(), t)` may act."""
        p = s.phase
        times: list[float | None] = []
        if p in (Phase.STARTING, Phase.BACKOFF):
            times.append(s.wake_at)
        elif p is Phase.LOADING:
            assert s.spawned_at is not None
            times.append(s.spawned_at + self.health.startup_timeout)
            if not s.ready_probe_in_flight:
                times.append(s.next_probe_at)
        elif p in (Phase.READY, Phase.UNHEALTHY):
            times.append(s.next_probe_at)
        elif p is Phase.STOPPING:
            times.append(s.stop_deadline)
        present = [t for t in times if t is not None]
        return min(present) if present else None


# ----------------------------------------------------------------------- exit descriptions


def signal_name(sig: int | None) -> str | None:
    if sig is None:
        return None
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_exit(returncode: int | None, sig: int | None, phase: Phase) -> str:
    when = "while loading" if phase in (Phase.LOADING, Phase.STARTING) else "while serving"
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
