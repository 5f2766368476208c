"""The pure decision core: `Policy.decide(state, event, now) -> (state, actions)`.

This module is longer than the others (about 780 lines) on purpose: it is the one place where
the supervisor decides anything, and splitting its cases across files would scatter exactly
what a reader comes here to see whole. The per-phase records, events and actions it works on
live in lifecycle.py, events.py and actions.py; the deep-check rules in deep.py/metrics.py;
the rules of a vLLM group across nodes in cluster/group.py (this module decides only what
the group's decisions mean for this node's vLLM: `_rank_start`, `_rank_stop`, `_group_ready`).

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
Every move is checked against `states.ALLOWED`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nika_supervisor import deep
from nika_supervisor.actions import (
    Action,
    AliasAnswered,
    ApplyConfig,
    CheckGroup,
    Diagnose,
    Drain,
    Exit,
    ExtendTimeout,
    LoadConfig,
    NotifyReady,
    NotifyReloading,
    NotifyStopping,
    Preflight,
    RankGone,
    RankStarted,
    RunDeep,
    SampleGpu,
    SignalGroup,
    Spawn,
    StartProbe,
    log,
    log_fields,
)
from nika_supervisor.budget import backoff_delay, in_window
from nika_supervisor.config import GpuConfig, HealthConfig, RestartConfig
from nika_supervisor.deep import DeepState
from nika_supervisor.durations import format_duration
from nika_supervisor.events import (
    Boot,
    ChildExited,
    ConfigLoaded,
    ConfigRejected,
    Diagnosed,
    Drained,
    Event,
    Generated,
    GpuReport,
    GpuSampled,
    GroupFailed,
    GroupGone,
    GroupReady,
    LiveProbe,
    LoadStalled,
    MetricsRead,
    OutputDropped,
    PreflightResult,
    RankStart,
    RankStop,
    ReadyProbe,
    ReloadRequested,
    RestartRequested,
    ServerUp,
    Spawned,
    SpawnFailed,
    StopRequested,
    Tick,
)
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.failures import (
    BUDGET_SPENT_EXIT,
    GIVE_UP_EXIT,
    Failure,
    Severity,
    describe_exit,
    exit_hint,
    signal_name,
)
from nika_supervisor.gpu.residency import check_residency, residency_threshold
from nika_supervisor.lifecycle import (
    RECORD_OF,
    UNSET,
    Backoff,
    Done,
    Life,
    Loading,
    Record,
    Serving,
    Starting,
    State,
    Stopping,
    Then,
    Waiting,
)
from nika_supervisor.states import (
    RUNNING_PHASES,
    TERMINAL_PHASES,
    Phase,
    check_move,
)

READY_POLL_S = 0.25  # readiness poll while loading (a fallback: ServerUp probes at once)
FAST_POLL_S = 0.02  # ... and for FAST_POLL_FOR_S after ServerUp, if the alias is not listed yet
FAST_POLL_FOR_S = 5.0
PREFLIGHT_RETRY_S = 0.1  # re-check for orphans this often while they die
KILL_GRACE_S = 5.0  # after SIGKILL, how long the group gets to disappear
GROUP_POLL_S = 0.05  # while STOPPING, look for survivors of the group this often
EXTEND_EVERY_S = 5.0  # while systemd waits on us: EXTEND_TIMEOUT_USEC this often ...
EXTEND_BY_S = 20.0  # ... by this much, so a hung daemon still times out its start
DROPPED_LOG_EVERY_S = 60.0  # vllm.output_dropped at most this often
DRAIN_GRACE_S = 5.0  # past gate.drain_timeout, stop waiting for the gate's answer

SINGLE, HEAD, WORKER = "single", "head", "worker"  # Policy.role


@dataclass(frozen=True, slots=True)
class Policy:
    health: HealthConfig
    restart: RestartConfig
    gpu: GpuConfig = field(default_factory=GpuConfig)
    jitter: Callable[[], float] = field(default=lambda: 0.5)
    drain_timeout: float | None = None  # gate.drain_timeout; None: no gate, nothing to drain
    role: str = SINGLE  # SINGLE, or in a vLLM group across nodes HEAD or WORKER (issue 12)

    @classmethod
    def from_config(cls, cfg: Any, jitter: Callable[[], float] = lambda: 0.5) -> Policy:
        return cls(cfg.health, cfg.restart, cfg.gpu, jitter).with_config(cfg)

    def with_config(self, cfg: Any) -> Policy:
        gate, cluster = getattr(cfg, "gate", None), getattr(cfg, "cluster", None)
        role = SINGLE if cluster is None else HEAD if cluster.is_head else WORKER
        return replace(self, health=cfg.health, restart=cfg.restart, gpu=cfg.gpu,
                       drain_timeout=gate.drain_timeout if gate is not None else None,
                       role=role)

    # -- moves ------------------------------------------------------------------------------

    def _goto(self, s: State, phase: Phase, rec: Record, now: float, reason: str,
              acts: list[Action]) -> State:
        check_move(s.phase, phase, reason)
        assert isinstance(rec, RECORD_OF[phase]), (phase, rec)
        acts.append(log("phase.changed", "info", **{"from": str(s.phase), "to": str(phase),
                                                      "reason": reason}))
        return State(phase, now, rec, s.life)

    def _life(self, s: State, **changes: Any) -> State:
        return replace(s, life=replace(s.life, **changes))

    def _rec(self, s: State, **changes: Any) -> State:
        return replace(s, rec=replace(s.rec, **changes))

    def _start(self, s: State, now: float, reason: str, acts: list[Action]) -> State:
        acts.append(Preflight())
        return self._goto(s, Phase.STARTING, Starting(now + self.restart.stop_timeout), now,
                          reason, acts)

    def _stop(self, s: State, now: float, then: Then, code: int, reason: str,
              acts: list[Action], backoff_s: float = 0.0) -> State:
        """Begin ending the current group (or, with none, go straight to what follows)."""
        rec = s.rec
        if isinstance(rec, Stopping):
            return self._rec(s, then=then, exit_code=code, backoff_s=backoff_s)
        if not isinstance(rec, Loading | Serving):
            return self._after_stop(s, then, code, backoff_s, now, reason, acts)
        if self.role != SINGLE:  # the group hears of it before the rank is even gone
            acts.append(RankGone(reason, s.life.rank_epoch if self.role == WORKER else None))
        pid = rec.pid
        planned = then is Then.RESTART_NOW or (then is Then.EXIT and code == ExitCode.OK)
        if planned and isinstance(rec, Serving) and self.drain_timeout is not None:
            # The gate holds new requests and lets the ones in flight finish first. Its own
            # drain_timeout ends the wait; ours is a backstop should its answer never come.
            acts.append(Drain(pid, self.drain_timeout))
            stopping = Stopping(pid, now + self.drain_timeout + DRAIN_GRACE_S, then, code,
                                backoff_s, next_group_check=now + GROUP_POLL_S, draining=True)
            return self._goto(s, Phase.STOPPING, stopping, now, reason, acts)
        stopping = Stopping(pid, now, then, code, backoff_s, next_group_check=now + GROUP_POLL_S)
        s = self._goto(s, Phase.STOPPING, stopping, now, reason, acts)
        return self._terminate(s, now, acts)

    def _terminate(self, s: State, now: float, acts: list[Action]) -> State:
        """SIGTERM to the group of the Stopping record; SIGKILL follows at stop_timeout."""
        rec = s.rec
        assert isinstance(rec, Stopping)
        acts.append(log("vllm.signal", pgid=rec.pid, signal="SIGTERM"))
        # A stopped (SIGSTOPped, hung-in-T) process keeps SIGTERM pending until it runs again;
        # systemd sends SIGCONT after its kill signal for the same reason (systemd.kill(5)).
        acts += [SignalGroup(rec.pid, signal.SIGTERM), SignalGroup(rec.pid, signal.SIGCONT)]
        return self._rec(s, draining=False, deadline=now + self.restart.stop_timeout)

    def _after_stop(self, s: State, then: Then, code: int, backoff_s: float, now: float,
                    reason: str, acts: list[Action]) -> State:
        if then is Then.EXIT:
            final = Phase.STOPPED if code == ExitCode.OK else Phase.FAILED
            f = s.life.last_failure
            # A stop on request says so; the last failure (long recovered from) is not why.
            why = "stopped on request" if code == ExitCode.OK else f.cause if f else None
            acts.append(Exit(code, s.life.restarts, why))
            return self._goto(s, final, Done(code), now, reason, acts)
        if then is Then.RESTART_NOW:
            return self._start(s, now, reason, acts)
        if then is Then.WAIT:
            return self._goto(s, Phase.WAITING, Waiting(), now, reason, acts)
        return self._goto(s, Phase.BACKOFF, Backoff(now + backoff_s), now, reason, acts)

    def _give_up(self, s: State, now: float, failure: Failure, code: int, reason: str,
                 acts: list[Action]) -> State:
        """The one place the daemon gives up."""
        level = "critical" if code == ExitCode.GPU_FATAL else "error"
        acts.append(log("supervisor.gave_up", level, reason=reason, hint=failure.hint,
                        code=int(code), cause_code=failure.code))
        s = self._life(s, last_failure=failure)
        return self._stop(s, now, Then.EXIT, code, failure.cause, acts)

    def _fail(self, s: State, now: float, failure: Failure, acts: list[Action]) -> State:
        """A failure of the current vLLM (or of a start): a restart, or giving up."""
        s = self._life(s, last_failure=failure)
        if self.role != SINGLE and isinstance(s.rec, Starting):  # a start that never ran
            acts.append(RankGone(failure.cause, s.life.rank_epoch))
        if failure.severity in GIVE_UP_EXIT:
            return self._give_up(s, now, failure, GIVE_UP_EXIT[failure.severity],
                                 failure.cause, acts)
        if self.role == WORKER:
            # No restart of its own: the group policy has told the head, which restarts the
            # whole group (its restart budget counts it); this rank starts with the next one.
            s = self._stop(s, now, Then.WAIT, ExitCode.OK, failure.cause, acts)
            return self._life(s, rank_epoch=None)
        recent = in_window(s.life.restart_log, now, self.restart.window)
        if len(recent) >= self.restart.max_restarts:
            why = (f"{len(recent) + 1} failures within {format_duration(self.restart.window)} "
                   f"(max_restarts={self.restart.max_restarts}); last: {failure.cause}")
            return self._give_up(s, now, replace(failure, cause=f"gave up: {why}"),
                                 BUDGET_SPENT_EXIT, why, acts)
        delay = backoff_delay(self.restart, s.life.attempt, self.jitter())
        s = self._life(s, restart_log=(*recent, now), restarts=s.life.restarts + 1,
                       attempt=s.life.attempt + 1)
        acts.append(log("restart.scheduled", "warning", delay_s=round(delay, 3),
                        attempt=s.life.attempt, restarts_in_window=len(recent) + 1,
                        reason=failure.cause, code=failure.code))
        return self._stop(s, now, Then.BACKOFF, ExitCode.OK, failure.cause, acts, delay)

    def _fault(self, s: State, now: float, failure: Failure, acts: list[Action]) -> State:
        """A watcher (GPU, stall rule, canary, residency) says the running vLLM is broken."""
        acts.append(log("vllm.fault", "error", reason=failure.cause, hint=failure.hint,
                        code=failure.code))
        return self._fail(s, now, failure, acts)

    # -- the core -----------------------------------------------------------------------------

    def decide(self, s: State, ev: Event, now: float) -> tuple[State, list[Action]]:
        acts: list[Action] = []
        s = self._decide(s, ev, now, acts)
        return s, acts

    def _decide(self, s: State, ev: Event, now: float, acts: list[Action]) -> State:
        p, rec = s.phase, s.rec
        match ev:
            case Boot():
                s = replace(s, since=now, rec=Starting(now + self.restart.stop_timeout))
                s = self._life(s, gpu=ev.gpu, next_gpu_sample=now, next_gpu_log=now,
                               next_extend=now, attempt=ev.attempt,
                               restart_log=in_window(ev.restart_log, now, self.restart.window))
                if ev.gate_failure is not None:
                    return self._give_up(s, now, ev.gate_failure, BUDGET_SPENT_EXIT,
                                         ev.gate_failure.cause, acts)
                if ev.cluster_failure is not None:  # no token is a configuration error
                    f = ev.cluster_failure
                    code = ExitCode.CONFIG if f.code == "cluster.token" else BUDGET_SPENT_EXIT
                    return self._give_up(s, now, f, code, f.cause, acts)
                if ev.gpu_finding is not None:
                    s = self._report(s, ev.gpu_finding, now, acts)
                if s.phase is not Phase.STARTING:
                    return s
                if ev.delay_s > 0:  # a crash loop carried over: the backoff still owed first
                    return self._goto(s, Phase.BACKOFF, Backoff(now + ev.delay_s), now,
                                      "restart budget carried over from the history", acts)
                acts.append(Preflight())
                return s

            case Tick():
                return self._tick(s, now, acts)

            case StopRequested():
                acts.append(log("supervisor.stopping", signal=ev.signal))
                acts.append(NotifyStopping())
                if p in TERMINAL_PHASES:
                    return s
                return self._stop(s, now, Then.EXIT, ExitCode.OK, "stop requested", acts)

            case RestartRequested(reason=reason):
                return self._restart(s, now, reason, acts)

            case ReloadRequested():
                acts += [NotifyReloading(), log("supervisor.reload_requested"), LoadConfig()]
                return s

            case ConfigRejected(errors=errors):
                more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
                acts.append(log("supervisor.reload_rejected", "error", errors=list(errors),
                                hint="the running configuration stays in force"))
                s = self._life(s, config_error=errors[0] + more)
                if s.life.ever_ready and not s.life.reload_pending:
                    acts.append(NotifyReady())
                return s

            case ConfigLoaded():
                return self.with_config(ev.cfg)._reconfigured(s, ev, now, acts)

            case PreflightResult() if isinstance(rec, Starting):
                if ev.blocked is not None:
                    acts.append(log("vllm.start_blocked", "error", reason=ev.blocked.cause,
                                    hint=ev.blocked.hint))
                    return self._fail(s, now, ev.blocked, acts)
                if ev.orphans_pending:
                    if now >= rec.preflight_deadline:
                        f = Failure("processes of an earlier vLLM survive SIGKILL",
                                    "look for processes in D state (GPU driver hang); "
                                    "a reboot may be needed", code="orphans")
                        return self._fail(s, now, f, acts)
                    return self._rec(s, wake_at=now + PREFLIGHT_RETRY_S)
                if self.role == WORKER and s.life.rank_epoch is None:
                    return self._goto(s, Phase.WAITING, Waiting(), now,
                                      "waiting for the head's group to start", acts)
                acts.append(Spawn())
                return self._rec(s, wake_at=None)

            case Spawned(pid=pid) if isinstance(rec, Starting):
                if self.role != SINGLE:
                    acts.append(RankStarted(s.life.rank_epoch if self.role == WORKER else None))
                    s = self._life(s, group_ready=False)
                return self._goto(s, Phase.LOADING, Loading(pid, now, now), now, "spawned",
                                  acts)

            case SpawnFailed(failure=failure) if isinstance(rec, Starting):
                acts.append(log("vllm.spawn_failed", "error", reason=failure.cause,
                                hint=failure.hint))
                return self._fail(s, now, failure, acts)

            case ServerUp(pid=pid) if isinstance(rec, Loading) and pid == rec.pid:
                acts.append(log("vllm.server_up", "debug", pid=pid,
                                after_s=round(now - rec.spawned_at, 3)))
                s = self._rec(s, server_up_at=now)
                if rec.probe_in_flight:
                    return self._rec(s, probe_again=True)
                acts.append(StartProbe("ready", pid))
                return self._rec(s, probe_in_flight=True)

            case ReadyProbe(pid=pid) if isinstance(rec, Loading) and pid == rec.pid:
                return self._ready_probe(s, rec, ev, now, acts)

            case LiveProbe(pid=pid) if isinstance(rec, Serving) and pid == rec.pid:
                return self._live(s, rec, ev, now, acts)

            case ChildExited(pid=pid) if pid == s.pid:
                return self._exited(s, ev, now, acts)

            case Diagnosed(ask=ask) if ask.pid == s.pid and p in RUNNING_PHASES:
                return self._diagnosed(s, ev, now, acts)

            case GroupGone(pgid=pgid) if isinstance(rec, Stopping) and pgid == rec.pid:
                s = self._rec(s, group_gone=True)
                if rec.child_exited:
                    return self._after_stop(s, rec.then, rec.exit_code, rec.backoff_s, now,
                                            "process group gone", acts)
                return s

            case GpuReport(failure=failure):
                return self._report(s, failure, now, acts)

            case GpuSampled():
                return self._sampled(s, ev, now, acts)

            case MetricsRead(pid=pid) if isinstance(rec, Serving) and pid == rec.pid:
                d, logs, stalled, canary = deep.on_metrics(rec.deep, now, pid, ev.metrics)
                acts += logs
                s = self._rec(s, deep=d)
                if stalled is not None:
                    return self._fault(s, now, stalled, acts)
                if canary is not None:
                    acts.append(RunDeep(canary))
                return s

            case Generated(pid=pid) if isinstance(rec, Serving) and pid == rec.pid:
                d, logs, broken = deep.on_generated(rec.deep, self.health, ev.purpose,
                                                    ev.result, ev.env, ev.args)
                acts += logs
                s = self._rec(s, deep=d)
                return self._fault(s, now, broken, acts) if broken is not None else s

            case Drained() if isinstance(rec, Stopping) and rec.draining:
                return self._terminate(s, now, acts)  # the gate logged gate.drained

            case LoadStalled() if isinstance(rec, Loading):
                return self._fault(s, now, ev.failure, acts)

            case GroupFailed(failure=failure) if p in RUNNING_PHASES:
                acts.append(log("cluster.group_restart", "error", reason=failure.cause,
                                rank=ev.rank, hint=failure.hint))
                return self._fail(s, now, failure, acts)

            case RankStart(epoch=epoch):
                return self._rank_start(s, epoch, now, acts)

            case RankStop(cause=cause):
                return self._rank_stop(s, cause, now, acts)

            case GroupReady():
                return self._group_ready(s, ev, now, acts)

            case OutputDropped(count=count) if count > 0:
                s = self._life(s, dropped_lines=s.life.dropped_lines + count)
                return self._report_dropped(s, now, acts)

        return s  # stale or irrelevant: results for an old pid, duplicate events

    # -- cases ----------------------------------------------------------------------------

    def _restart(self, s: State, now: float, reason: str, acts: list[Action]) -> State:
        rec = s.rec
        if s.phase in RUNNING_PHASES and self.role == WORKER:
            # A worker's rank restarts only with its group: the head hears that it is gone
            # and restarts the group, which starts this rank again.
            s = self._stop(s, now, Then.WAIT, ExitCode.OK, reason, acts)
            return self._life(s, rank_epoch=None)
        if s.phase in RUNNING_PHASES:
            return self._stop(s, now, Then.RESTART_NOW, ExitCode.OK, reason, acts)
        if isinstance(rec, Backoff):
            return self._start(s, now, reason, acts)
        if isinstance(rec, Stopping) and rec.then is Then.BACKOFF:
            return self._rec(s, then=Then.RESTART_NOW)
        return s  # STARTING picks the new config up at spawn; terminal phases ignore it

    def _reconfigured(self, s: State, ev: ConfigLoaded, now: float,
                      acts: list[Action]) -> State:
        """A good reload (self is already the new policy): every component gets the new
        configuration; a launch change restarts vLLM, and systemd hears READY=1 again only
        when the new vLLM answers."""
        acts.append(ApplyConfig(ev.cfg))
        acts.append(log("supervisor.reloaded", restart_vllm=ev.launch_changed))
        s = self._life(s, config_error=None)
        if isinstance(s.rec, Serving):
            s = self._rec(s, deep=s.rec.deep.configure(self.health))
        if ev.launch_changed:
            if s.life.ever_ready and s.pid is not None:
                s = self._life(s, reload_pending=True, next_extend=now)
            s = self._restart(s, now, "configuration changed", acts)
        if s.life.ever_ready and not s.life.reload_pending:
            acts.append(NotifyReady())
        return s

    def _ready_probe(self, s: State, rec: Loading, ev: ReadyProbe, now: float,
                     acts: list[Action]) -> State:
        if not ev.ok:
            if rec.probe_again:
                acts.append(StartProbe("ready", rec.pid))
                return self._rec(s, probe_again=False)
            up = rec.server_up_at
            poll = FAST_POLL_S if up is not None and now - up < FAST_POLL_FOR_S else READY_POLL_S
            return self._rec(s, probe_in_flight=False, next_probe_at=now + poll)
        if self.role == HEAD:  # READY also needs every rank in the group (GroupReady)
            acts.append(AliasAnswered())
            s = self._rec(s, probe_in_flight=False, answered=True)
            return self._ready(s, replace(rec, answered=True), now, acts) \
                if s.life.group_ready else s
        return self._ready(s, rec, now, acts)

    def _ready(self, s: State, rec: Loading, now: float, acts: list[Action],
               reason: str = "model listed") -> State:
        acts.append(log("vllm.ready", pid=rec.pid, load_s=round(now - rec.spawned_at, 3),
                        restarts=s.life.restarts))
        acts.append(NotifyReady())
        s = self._life(s, ever_ready=True, reload_pending=False,
                       last_load_s=now - rec.spawned_at)
        serving = Serving(rec.pid, rec.spawned_at, now, now + self.health.interval,
                          DeepState.fresh(self.health))
        return self._goto(s, Phase.READY, serving, now, reason, acts)

    def _live(self, s: State, rec: Serving, ev: LiveProbe, now: float,
              acts: list[Action]) -> State:
        if ev.ok:
            if s.phase is Phase.UNHEALTHY and s.life.group_ready:
                acts.append(log("health.recovered", after_failures=rec.failures))
                return self._goto(s, Phase.READY, replace(rec, failures=0), now, "probe ok",
                                  acts)
            return self._rec(s, failures=0)
        if ev.engine_dead:
            acts.append(log("health.failed", "error", probe=ev.probe, reason=ev.reason,
                            consecutive=rec.failures + 1, engine_dead=True))
            acts.append(Diagnose(rec.pid, "engine_dead", reason=ev.reason))
            return s
        failures = rec.failures + 1
        acts.append(log("health.failed", "warning", probe=ev.probe, reason=ev.reason,
                        consecutive=failures, threshold=self.health.failure_threshold))
        rec = replace(rec, failures=failures)
        s = replace(s, rec=rec)
        if failures >= self.health.failure_threshold:
            f = Failure(f"unresponsive: {failures} failed probes, last: {ev.reason}",
                        "a hung or overloaded server; see vLLM's output above", code="health")
            return self._fail(s, now, f, acts)
        if s.phase is Phase.READY:
            return self._goto(s, Phase.UNHEALTHY, rec, now, f"probe failed: {ev.reason}", acts)
        return s

    def _exited(self, s: State, ev: ChildExited, now: float, acts: list[Action]) -> State:
        rec = s.rec
        if isinstance(rec, Stopping):
            acts.append(log("vllm.exited", "info", pid=ev.pid, returncode=ev.returncode,
                            signal=signal_name(ev.signal), requested=True, cause=None,
                            hint=None, diagnosis=None, phase=str(s.phase)))
            s = self._rec(s, child_exited=True)
            if rec.group_gone:
                return self._after_stop(s, rec.then, rec.exit_code, rec.backoff_s, now,
                                        "vLLM exited", acts)
            return self._terminate(s, now, acts) if rec.draining else s
        # An exit nobody asked for: what does vLLM's output say?
        acts.append(Diagnose(ev.pid, "exit", ev.returncode, ev.signal,
                             loading=s.phase is Phase.LOADING))
        return s

    def _diagnosed(self, s: State, ev: Diagnosed, now: float, acts: list[Action]) -> State:
        ask, d = ev.ask, ev.failure
        if ask.context == "engine_dead":
            f = (replace(d, cause=f"engine dead ({ask.reason}): {d.cause}") if d is not None
                 else Failure(f"engine dead: {ask.reason}",
                              "vLLM's engine died; see its output above", code="engine_dead"))
            return self._fail(s, now, f, acts)
        failure = d or Failure(describe_exit(ask.returncode, ask.signal, ask.loading),
                               exit_hint(ask.returncode, ask.signal), code="exit")
        acts.append(log("vllm.exited", "error", pid=ask.pid, returncode=ask.returncode,
                        signal=signal_name(ask.signal), requested=False, cause=failure.cause,
                        hint=failure.hint, diagnosis=failure.code, phase=str(s.phase)))
        # The process is gone; its group (EngineCore, workers) may not be: STOPPING ends it.
        s = self._fail(s, now, failure, acts)
        if isinstance(s.rec, Stopping) and s.rec.pid == ask.pid:
            s = self._rec(s, child_exited=True)
        return s

    # -- a vLLM group across nodes (issue 12; the group policy is cluster/group.py) ---------

    def _rank_start(self, s: State, epoch: int, now: float, acts: list[Action]) -> State:
        """Worker: the head's group `epoch` starts; this node's rank joins it."""
        rec = s.rec
        if self.role != WORKER or s.phase in RUNNING_PHASES or s.phase in TERMINAL_PHASES:
            return s
        acts.append(log("cluster.rank_start", epoch=epoch))
        s = self._life(s, rank_epoch=epoch)
        if isinstance(rec, Waiting | Backoff):
            return self._start(s, now, f"group epoch {epoch} starting", acts)
        if isinstance(rec, Stopping) and rec.then is not Then.EXIT:
            return self._rec(s, then=Then.RESTART_NOW)
        return s  # STARTING: the preflight under way spawns for this epoch

    def _rank_stop(self, s: State, cause: str, now: float, acts: list[Action]) -> State:
        """Worker: the group this rank belonged to is gone (or its head is unreachable)."""
        rec = s.rec
        if self.role != WORKER or s.phase in TERMINAL_PHASES:
            return s
        s = self._life(s, rank_epoch=None)
        if s.phase in RUNNING_PHASES:
            acts.append(log("cluster.rank_stop", "warning", reason=cause))
            return self._stop(s, now, Then.WAIT, ExitCode.OK, cause, acts)
        if isinstance(rec, Stopping) and rec.then is Then.RESTART_NOW:
            return self._rec(s, then=Then.WAIT)
        return s  # STARTING: the preflight under way ends in WAITING

    def _group_ready(self, s: State, ev: GroupReady, now: float, acts: list[Action]) -> State:
        if self.role == SINGLE or ev.ready == s.life.group_ready:
            return s
        acts.append(log("cluster.ready", "info" if ev.ready else "warning", ready=ev.ready,
                        reason=ev.reason))
        s = self._life(s, group_ready=ev.ready)
        rec = s.rec
        if isinstance(rec, Loading) and ev.ready and (self.role == WORKER or rec.answered):
            return self._ready(s, rec, now, acts, f"group: {ev.reason}")
        if not isinstance(rec, Serving):
            return s
        if s.phase is Phase.READY and not ev.ready:
            return self._goto(s, Phase.UNHEALTHY, rec, now, f"group: {ev.reason}", acts)
        if s.phase is Phase.UNHEALTHY and ev.ready and rec.failures == 0:
            return self._goto(s, Phase.READY, rec, now, f"group: {ev.reason}", acts)
        return s

    # -- the GPU ------------------------------------------------------------------------------

    def _report(self, s: State, f: Failure, now: float, acts: list[Action]) -> State:
        """A GPU finding, mapped by severity (README.md, GPU health)."""
        p = s.phase
        if f.severity is Severity.WARN:
            acts.append(log_fields("gpu.finding", "warning", f.fields()))
            return s
        if f.severity in GIVE_UP_EXIT:
            acts.append(log_fields("gpu.fatal", "critical", f.fields()))
            if p in TERMINAL_PHASES:
                return s
            if p in RUNNING_PHASES:
                return self._fault(s, now, f, acts)
            return self._give_up(s, now, f, GIVE_UP_EXIT[f.severity], f.cause, acts)
        # RETRY: only about a vLLM that is running. Xids 43/45 also follow our own kill.
        if p in RUNNING_PHASES:
            acts.append(log_fields("gpu.finding", "error", f.fields()))
            return self._fault(s, now, f, acts)
        acts.append(log_fields("gpu.finding_ignored", "info", {"phase": str(p), **f.fields()}))
        return s

    def _sampled(self, s: State, ev: GpuSampled, now: float, acts: list[Action]) -> State:
        if now >= s.life.next_gpu_log:
            s = self._life(s, next_gpu_log=now + self.gpu.sample_interval)
            acts.append(log_fields("gpu.sample", "info", dict(ev.fields)))
        for f in ev.findings:
            s = self._report(s, f, now, acts)
        rec = s.rec
        if s.phase is not Phase.READY or not isinstance(rec, Serving) or rec.pid != ev.pid:
            return s
        if rec.residency is UNSET:
            floor = residency_threshold(self.gpu.min_resident_memory, ev.resident_bytes)
            rec = replace(rec, residency=floor)
            s = replace(s, rec=rec)
            if floor is not None:
                acts.append(log("gpu.residency", pid=rec.pid, held=ev.resident_bytes,
                                min_resident=floor))
        assert not isinstance(rec.residency, str)
        finding = check_residency(rec.residency, ev.resident_bytes)
        return self._report(s, finding.failure, now, acts) if finding is not None else s

    # -- time -----------------------------------------------------------------------------

    def extending(self, s: State) -> bool:
        """While systemd waits on us (start, a restarting reload, the final stop), keep its
        timeout alive; a daemon that hangs stops extending and times out (sd_notify(3))."""
        rec = s.rec
        final_stop = isinstance(rec, Stopping) and rec.then is Then.EXIT
        return s.phase not in TERMINAL_PHASES and (
            not s.life.ever_ready or s.life.reload_pending or final_stop)

    def _tick(self, s: State, now: float, acts: list[Action]) -> State:
        life = s.life
        if self.extending(s) and now >= life.next_extend:
            acts.append(ExtendTimeout(EXTEND_BY_S))
            s = self._life(s, next_extend=now + EXTEND_EVERY_S)
        if life.gpu and s.phase not in TERMINAL_PHASES and now >= life.next_gpu_sample:
            acts.append(SampleGpu(s.pid))
            s = self._life(s, next_gpu_sample=now + self.health.interval)
        s = self._report_dropped(s, now, acts)
        return self._tick_phase(s, s.rec, now, acts)

    def _tick_phase(self, s: State, rec: Record, now: float, acts: list[Action]) -> State:
        match rec:
            case Starting(wake_at=wake) if wake is not None and now >= wake:
                acts.append(Preflight())
                return self._rec(s, wake_at=None)
            case Backoff(wake_at=wake) if now >= wake:
                return self._start(s, now, "backoff elapsed", acts)
            case Loading():
                if now - rec.spawned_at >= self.health.startup_timeout:
                    f = Failure(f"not ready after {format_duration(self.health.startup_timeout)}"
                                " (health.startup_timeout)",
                                "raise health.startup_timeout if the model loads slowly; "
                                "otherwise see vLLM's output above", code="startup_timeout")
                    return self._fail(s, now, f, acts)
                if self._probing(rec) and now >= rec.next_probe_at:
                    acts.append(StartProbe("ready", rec.pid))
                    return self._rec(s, probe_in_flight=True)
            case Serving():
                return self._tick_serving(s, rec, now, acts)
            case Stopping():
                return self._tick_stopping(s, rec, now, acts)
        return s

    def _probing(self, rec: Loading) -> bool:
        """Whether a readiness probe is due at rec.next_probe_at: a worker serves no API
        (nothing to probe), and a head whose alias answered waits for its group."""
        return self.role != WORKER and not rec.probe_in_flight and not rec.answered

    def _tick_serving(self, s: State, rec: Serving, now: float, acts: list[Action]) -> State:
        if self.role == WORKER:
            return s  # no API to probe: its group's READY and the GPU watch it
        healthy_s = now - rec.ready_at
        if s.life.attempt and healthy_s >= self.restart.healthy_after:
            acts.append(log("restart.backoff_reset", healthy_s=round(healthy_s, 1)))
            s = self._life(s, attempt=0)
        d, work = deep.due(rec.deep, self.health, now, rec.pid)
        acts += [RunDeep(w) for w in work]
        rec = replace(rec, deep=d)
        if now >= rec.next_probe_at:
            acts.append(StartProbe("live", rec.pid))
            # Keep the cadence (probes may overlap when each waits for its timeout), but
            # never schedule into the past after the loop itself was held up.
            nxt = rec.next_probe_at + self.health.interval
            rec = replace(rec, next_probe_at=nxt if nxt > now else now + self.health.interval)
        return replace(s, rec=rec)

    def _tick_stopping(self, s: State, rec: Stopping, now: float, acts: list[Action]) -> State:
        if not rec.group_gone and now >= rec.next_group_check:
            acts.append(CheckGroup(rec.pid))
            s = self._rec(s, next_group_check=now + GROUP_POLL_S)
        if now < rec.deadline:
            return s
        if rec.draining:
            acts.append(log("gate.drain_unanswered", "warning", pid=rec.pid,
                            waited_s=round(now - s.since, 3),
                            hint="the gate did not report its drain; vLLM is stopped anyway"))
            return self._terminate(s, now, acts)
        if not rec.killed:
            acts.append(log("vllm.stop_timeout", "warning", pid=rec.pid,
                            stop_timeout_s=self.restart.stop_timeout))
            acts.append(log("vllm.signal", pgid=rec.pid, signal="SIGKILL"))
            acts.append(SignalGroup(rec.pid, signal.SIGKILL))
            return self._rec(s, killed=True, deadline=now + KILL_GRACE_S)
        acts.append(log("vllm.unkillable", "critical", pid=rec.pid,
                        hint="processes survive SIGKILL: a GPU driver hang? a reboot may "
                             "be needed"))
        return self._after_stop(s, rec.then, rec.exit_code, rec.backoff_s, now,
                                "group survives SIGKILL", acts)

    def _report_dropped(self, s: State, now: float, acts: list[Action]) -> State:
        life = s.life
        new = life.dropped_lines - life.logged_dropped
        if new <= 0 or now < life.next_dropped_log:
            return s
        acts.append(log("vllm.output_dropped", "warning", lines=new, total=life.dropped_lines,
                        hint="the journal could not keep up with vLLM's output; see "
                             "`journalctl -u systemd-journald`"))
        return self._life(s, logged_dropped=life.dropped_lines,
                          next_dropped_log=now + DROPPED_LOG_EVERY_S)

    def next_deadline(self, s: State) -> float | None:
        """The earliest monotonic time at which `decide(s, Tick(), t)` may act."""
        rec, life = s.rec, s.life
        times: list[float | None] = []
        match rec:
            case Starting() | Backoff():
                times.append(rec.wake_at)
            case Loading():
                times.append(rec.spawned_at + self.health.startup_timeout)
                if self._probing(rec):
                    times.append(rec.next_probe_at)
            case Serving() if self.role != WORKER:
                times += [rec.next_probe_at, deep.deadline(rec.deep, self.health)]
                if life.attempt:
                    times.append(rec.ready_at + self.restart.healthy_after)
            case Stopping():
                times.append(rec.deadline)
                if not rec.group_gone:
                    times.append(rec.next_group_check)
        if s.phase not in TERMINAL_PHASES:
            if self.extending(s):
                times.append(life.next_extend)
            if life.gpu:
                times.append(life.next_gpu_sample)
            if life.dropped_lines > life.logged_dropped:
                times.append(life.next_dropped_log)
        present = [t for t in times if t is not None]
        return min(present) if present else None


__all__ = ["Life", "Policy", "State", "Then"]
