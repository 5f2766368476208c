"""The decision core, driven by scripted histories with an injected clock: no processes, no
sockets, no sleeps. Each test pins down one rule of docs/ARCHITECTURE.md / issue 2."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest
from helpers.clock import FakeClock

from nika_supervisor.actions import (
    Action,
    Diagnose,
    Exit,
    Log,
    NotifyReady,
    NotifyStopping,
    Preflight,
    SignalGroup,
    Spawn,
    StartProbe,
)
from nika_supervisor.budget import backoff_delay
from nika_supervisor.config import HealthConfig, RestartConfig
from nika_supervisor.events import (
    Boot,
    ChildExited,
    Diagnosed,
    Event,
    GpuReport,
    GroupGone,
    LiveProbe,
    PreflightResult,
    ReadyProbe,
    RestartRequested,
    Spawned,
    StopRequested,
    Tick,
)
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.failures import Failure, Severity
from nika_supervisor.lifecycle import State
from nika_supervisor.policy import Policy
from nika_supervisor.states import ALLOWED, IllegalMove, Phase, check_move

HEALTH = HealthConfig(interval=5.0, timeout=10.0, failure_threshold=3, startup_timeout=60.0)
RESTART = RestartConfig(backoff_initial=5.0, backoff_max=40.0, max_restarts=3, window=600.0,
                        stop_timeout=30.0, healthy_after=100.0)
TERM, KILL = signal.SIGTERM, signal.SIGKILL


class Run:
    """A policy, a state and a clock, with the actions of every step kept. Diagnose actions
    are answered at once with `diagnosis` (what the diagnoser would say), as the executor
    does."""

    def __init__(self, health: HealthConfig = HEALTH, restart: RestartConfig = RESTART) -> None:
        self.policy = Policy(health, restart, jitter=lambda: 0.0)
        self.clock = FakeClock()
        self.state = State()
        self.actions: list[Action] = []
        self.diagnosis: Failure | None = None

    def feed(self, ev: Event, after: float = 0.0) -> list[Action]:
        self.clock.advance(after)
        self.state, acts = self.policy.decide(self.state, ev, self.clock.now())
        self.actions += acts
        for a in list(acts):
            if isinstance(a, Diagnose):
                acts += self.feed(Diagnosed(a, self.diagnosis))
        return acts

    def tick_until(self, t: float) -> list[Action]:
        """Advance to absolute time t by following next_deadline, ticking at each."""
        acts: list[Action] = []
        while True:
            nxt = self.policy.next_deadline(self.state)
            if nxt is None or nxt > t:
                break
            self.clock.t = max(self.clock.t, nxt)
            acts += self.feed(Tick())
        self.clock.t = max(self.clock.t, t)
        return acts

    def phases(self) -> list[tuple[str, str]]:
        return [(str(e["from"]), str(e["to"])) for e in self.events("phase.changed")]

    def events(self, name: str) -> list[dict[str, object]]:
        return [a.as_dict() for a in self.actions if isinstance(a, Log) and a.event == name]

    @property
    def life(self):
        return self.state.life

    def start_ready(self, pid: int = 100) -> None:
        assert self.feed(Boot()) == [Preflight()]
        assert self.feed(PreflightResult()) == [Spawn()]
        self.feed(Spawned(pid))
        assert StartProbe("ready", pid) in self.feed(Tick())
        self.feed(ReadyProbe(pid, True), after=1.0)
        assert self.state.phase is Phase.READY


def kinds(acts: list[Action]) -> list[type]:
    return [type(a) for a in acts if not isinstance(a, Log)]


def test_ready_only_after_the_alias_is_listed() -> None:
    """NotifyReady comes with the first successful readiness probe and not before."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(100))
    for _ in range(5):
        r.feed(Tick())
        acts = r.feed(ReadyProbe(100, False, "alias 'nika' not listed by /v1/models"), after=0.1)
        assert NotifyReady() not in acts
        r.tick_until(r.clock.t + 0.25)
    r.feed(Tick())
    acts = r.feed(ReadyProbe(100, True))
    assert NotifyReady() in acts
    assert r.phases() == [("starting", "loading"), ("loading", "ready")]


def test_ready_probes_poll_at_a_quarter_second_while_loading() -> None:
    """While loading, a new readiness probe is due 0.25 s after the last answer (ready lag)."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(7))
    assert StartProbe("ready", 7) in r.feed(Tick())
    assert StartProbe("ready", 7) not in r.tick_until(r.clock.t + 1.0)  # one in flight
    r.feed(ReadyProbe(7, False), after=0.05)
    t = r.clock.t
    assert StartProbe("ready", 7) not in r.tick_until(t + 0.249)
    assert StartProbe("ready", 7) in r.tick_until(t + 0.25)


def test_stale_probe_results_for_an_old_pid_are_ignored() -> None:
    """A probe answer about an earlier vLLM cannot make the new one ready."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(200))
    acts = r.feed(ReadyProbe(199, True))
    assert acts == [] and r.state.phase is Phase.LOADING


def test_unrequested_exit_0_is_a_failure_and_restarts_after_backoff() -> None:
    """Exit code 0 that the supervisor did not ask for counts as a crash (vLLM exits 0 after
    engine death); the group is signalled, then backoff, then a new start."""
    r = Run()
    r.start_ready()
    acts = r.feed(ChildExited(100, 0, None), after=10)
    assert SignalGroup(100, TERM) in acts
    exited = r.events("vllm.exited")[-1]
    assert exited["requested"] is False and "code 0" in str(exited["cause"])
    r.feed(GroupGone(100))
    assert r.state.phase is Phase.BACKOFF
    assert r.state.rec.wake_at == pytest.approx(r.clock.t + 5.0)
    acts = r.tick_until(r.clock.t + 5.0)
    assert Preflight() in acts and r.state.phase is Phase.STARTING
    assert r.life.restarts == 1
    assert r.phases() == [("starting", "loading"), ("loading", "ready"), ("ready", "stopping"),
                          ("stopping", "backoff"), ("backoff", "starting")]


def test_no_restart_while_the_old_group_lives() -> None:
    """After the API server dies, nothing starts until GroupGone: orphans first."""
    r = Run()
    r.start_ready()
    r.feed(ChildExited(100, None, signal.SIGKILL))
    acts = r.tick_until(r.clock.t + 29.0)
    assert Preflight() not in acts and Spawn() not in acts
    assert r.state.phase is Phase.STOPPING


def test_stop_escalates_to_sigkill_after_stop_timeout() -> None:
    """SIGTERM to the group, then SIGKILL at stop_timeout, from a deadline (no sleep)."""
    r = Run()
    r.start_ready()
    t0 = r.clock.t
    acts = r.feed(StopRequested())
    assert NotifyStopping() in acts and SignalGroup(100, TERM) in acts
    acts = r.tick_until(t0 + 29.9)
    assert SignalGroup(100, KILL) not in acts
    acts = r.tick_until(t0 + 30.0)
    assert SignalGroup(100, KILL) in acts
    r.feed(ChildExited(100, None, signal.SIGKILL))
    acts = r.feed(GroupGone(100))
    assert Exit(ExitCode.OK) in acts and r.state.phase is Phase.STOPPED


def test_exit_and_group_gone_in_either_order_complete_the_stop() -> None:
    """The waiter thread and the group poll race; both orders end the stop once."""
    exited = ChildExited(100, 0, None)
    for order in ((exited, GroupGone(100)), (GroupGone(100), exited)):
        r = Run()
        r.start_ready()
        r.feed(StopRequested())
        acts = r.feed(order[0]) + r.feed(order[1])
        assert acts.count(Exit(ExitCode.OK)) == 1
        assert r.events("vllm.exited")[-1]["requested"] is True


def test_hang_is_detected_after_threshold_failures_with_overlapping_probes() -> None:
    """Probes keep their cadence while earlier ones wait for their timeout, so a hang is
    detected within interval x threshold + timeout."""
    r = Run()
    r.start_ready()
    t_hang = r.clock.t
    started = []
    detected_at = None
    for step in range(200):
        now = t_hang + step * 0.5
        for a in r.tick_until(now):
            if isinstance(a, StartProbe):
                started.append(now)
        # every probe started times out after `timeout` seconds
        while started and started[0] + HEALTH.timeout <= now:
            started.pop(0)
            acts = r.feed(LiveProbe(100, False, reason="no answer within 10s"))
            if SignalGroup(100, TERM) in acts:
                detected_at = r.clock.t
                break
        if detected_at:
            break
    assert detected_at is not None
    bound = HEALTH.interval * HEALTH.failure_threshold + HEALTH.timeout
    assert detected_at - t_hang <= bound
    assert [e["consecutive"] for e in r.events("health.failed")] == [1, 2, 3]
    assert ("ready", "unhealthy") in r.phases()


def test_a_success_resets_the_failure_count() -> None:
    """Two failures, then a success: back to READY and the count starts over."""
    r = Run()
    r.start_ready()
    r.feed(LiveProbe(100, False, reason="x"))
    r.feed(LiveProbe(100, False, reason="x"))
    assert r.state.phase is Phase.UNHEALTHY
    r.feed(LiveProbe(100, True))
    assert r.state.phase is Phase.READY and r.state.rec.failures == 0
    r.feed(LiveProbe(100, False, reason="x"))
    assert r.state.phase is Phase.UNHEALTHY and r.state.rec.failures == 1


def test_engine_dead_restarts_at_once() -> None:
    """/health 503 means the engine is dead: one answer is enough."""
    r = Run()
    r.start_ready()
    acts = r.feed(LiveProbe(100, False, engine_dead=True, reason="/health answered 503"))
    assert SignalGroup(100, TERM) in acts
    assert r.life.last_failure is not None and "engine dead" in r.life.last_failure.cause


def test_startup_timeout_kills_and_counts_a_failed_start() -> None:
    """Not ready within startup_timeout: stop the group and schedule a restart."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(5))
    t0 = r.clock.t
    acts = []
    while r.state.phase is Phase.LOADING:
        for a in r.tick_until(r.clock.t + 0.25):
            acts.append(a)
            if isinstance(a, StartProbe):
                r.feed(ReadyProbe(5, False))
    assert r.clock.t - t0 == pytest.approx(60.0, abs=0.3)
    assert SignalGroup(5, TERM) in acts
    assert r.life.last_failure is not None and r.life.last_failure.code == "startup_timeout"
    assert r.events("restart.scheduled")


def test_backoff_doubles_and_caps() -> None:
    """backoff_initial x 2^attempt, capped at backoff_max, jitter takes off at most 20 %."""
    cfg = RESTART
    assert [backoff_delay(cfg, a, 0.0) for a in range(6)] == [5, 10, 20, 40, 40, 40]
    assert backoff_delay(cfg, 0, 0.999) == pytest.approx(4.001, abs=0.01)
    assert backoff_delay(replace(cfg, backoff_initial=0.0), 3, 0.5) == 0.0


def crash_loop(r: Run, n: int, spacing: float = 1.0) -> list[Action]:
    """Crash the server during loading n times, following every backoff."""
    acts: list[Action] = []
    pid = 300
    for _ in range(n):
        if r.state.phase in (Phase.FAILED, Phase.STOPPED):
            break
        while r.state.phase is not Phase.STARTING:
            nxt = r.policy.next_deadline(r.state)
            assert nxt is not None, r.state.phase
            r.clock.t = max(r.clock.t, nxt)
            acts += r.feed(Tick())
        acts += r.feed(PreflightResult())
        pid += 1
        acts += r.feed(Spawned(pid))
        acts += r.feed(ChildExited(pid, 1, None), after=spacing)
        acts += r.feed(GroupGone(pid))
    return acts


def test_give_up_after_max_restarts_within_window_exits_69() -> None:
    """max_restarts restarts are allowed in the window; the next failure gives up (exit 69)
    with backoff delays growing on the way."""
    r = Run()
    r.feed(Boot())
    acts = crash_loop(r, 10)
    assert Exit(ExitCode.GAVE_UP) in acts
    assert r.state.phase is Phase.FAILED
    assert [e["delay_s"] for e in r.events("restart.scheduled")] == [5.0, 10.0, 20.0]
    gave_up = r.events("supervisor.gave_up")
    assert len(gave_up) == 1 and "4 failures" in str(gave_up[0]["reason"])
    assert r.life.last_failure is not None and r.life.last_failure.cause.startswith("gave up")


def test_failures_outside_the_window_do_not_count() -> None:
    """Restarts older than `window` fall out of the budget."""
    r = Run(restart=replace(RESTART, window=30.0, backoff_max=5.0))
    r.feed(Boot())
    acts = crash_loop(r, 12, spacing=10.0)
    assert Exit(ExitCode.GAVE_UP) not in acts
    assert r.life.restarts == 12


def test_backoff_resets_only_after_a_healthy_stretch() -> None:
    """attempt goes back to 0 after healthy_after seconds of READY, not at READY."""
    r = Run()
    r.start_ready()
    r.feed(ChildExited(100, 1, None))
    r.feed(GroupGone(100))
    r.tick_until(r.clock.t + 5.0)
    r.feed(PreflightResult())
    r.feed(Spawned(101))
    r.feed(Tick())
    r.feed(ReadyProbe(101, True))
    assert r.life.attempt == 1
    r.tick_until(r.clock.t + 99.0)
    assert r.life.attempt == 1
    r.tick_until(r.clock.t + 6.0)
    assert r.life.attempt == 0 and r.events("restart.backoff_reset")


def test_model_problem_gives_up_at_once_with_79() -> None:
    """A deterministic failure (diagnosis verdict give-up) skips the retry budget."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(9))
    bad = Failure("vLLM rejected a flag", "fix vllm.args", Severity.MODEL, "bad_flag")
    r.diagnosis = bad
    r.feed(ChildExited(9, 2, None))
    acts = r.feed(GroupGone(9))
    assert Exit(ExitCode.MODEL_PROBLEM) in acts
    assert r.life.restarts == 0 and r.events("supervisor.gave_up")


def test_gpu_fatal_fault_stops_vllm_and_exits_80() -> None:
    """A fatal GPU finding while serving stops vLLM and exits 80 without a restart."""
    r = Run()
    r.start_ready()
    lost = Failure("GPU fell off the bus (Xid 79)", "GPU needs reset/reboot",
                   Severity.GPU_FATAL, "xid.79")
    acts = r.feed(GpuReport(lost))
    assert SignalGroup(100, TERM) in acts
    r.feed(ChildExited(100, None, signal.SIGTERM))
    acts = r.feed(GroupGone(100))
    assert Exit(ExitCode.GPU_FATAL) in acts
    assert r.life.last_failure == lost


def test_gpu_fatal_during_backoff_exits_80() -> None:
    """A fatal finding with no vLLM running ends the daemon instead of another start."""
    r = Run()
    r.start_ready()
    r.feed(ChildExited(100, 1, None))
    r.feed(GroupGone(100))
    assert r.state.phase is Phase.BACKOFF
    acts = r.feed(GpuReport(Failure("driver/library version mismatch", "reboot",
                                Severity.GPU_FATAL, "nvml.mismatch")))
    assert Exit(ExitCode.GPU_FATAL) in acts


def test_retry_fault_restarts() -> None:
    """A restart-class GPU finding (an application Xid) restarts through STOPPING."""
    r = Run()
    r.start_ready()
    acts = r.feed(GpuReport(Failure("Xid 13: graphics engine exception", code="xid.13")))
    assert SignalGroup(100, TERM) in acts and r.state.rec.then == "backoff"
    assert [e["code"] for e in r.events("vllm.fault")] == ["xid.13"]


def test_blocked_preflight_counts_as_a_failed_start() -> None:
    """A busy port or a foreign GPU holder refuses the start and goes to backoff."""
    r = Run()
    r.feed(Boot())
    acts = r.feed(PreflightResult(blocked=Failure("port 1107 on 127.0.0.1 is already in use")))
    assert Spawn() not in acts and r.state.phase is Phase.BACKOFF
    assert r.phases() == [("starting", "backoff")]


def test_orphans_are_waited_for_then_reported() -> None:
    """Orphans of an earlier instance delay the spawn; past stop_timeout it is a failure."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult(orphans_pending=True))
    acts = r.tick_until(r.clock.t + 0.1)
    assert Preflight() in acts
    r.feed(PreflightResult())
    assert r.actions[-1] == Spawn()
    r2 = Run()
    r2.feed(Boot())
    while r2.state.phase is Phase.STARTING:
        r2.feed(PreflightResult(orphans_pending=True))
        r2.tick_until(r2.clock.t + 0.1)
    assert r2.life.last_failure is not None and r2.life.last_failure.code == "orphans"


def test_stop_during_backoff_exits_0_at_once() -> None:
    """SIGTERM while waiting to restart ends the daemon without a start."""
    r = Run()
    r.start_ready()
    r.feed(ChildExited(100, 1, None))
    r.feed(GroupGone(100))
    acts = r.feed(StopRequested())
    assert kinds(acts) == [NotifyStopping, Exit] and r.state.phase is Phase.STOPPED


def test_planned_restart_skips_backoff_and_budget() -> None:
    """A reload with new launch settings restarts vLLM at once and is not a failure."""
    r = Run()
    r.start_ready()
    r.feed(RestartRequested("configuration changed"))
    r.feed(ChildExited(100, None, signal.SIGTERM))
    acts = r.feed(GroupGone(100))
    assert Preflight() in acts and r.state.phase is Phase.STARTING
    assert r.life.restarts == 0 and r.life.last_failure is None


def test_moves_outside_the_table_are_bugs() -> None:
    """Every move is checked against states.ALLOWED; a no-op move (llama-swap's check) and a
    jump that skips STOPPING are refused."""
    with pytest.raises(IllegalMove):
        check_move(Phase.READY, Phase.READY, "x")
    with pytest.raises(IllegalMove):
        check_move(Phase.READY, Phase.BACKOFF, "no stop first")
    assert all(p not in ALLOWED[p] for p in Phase)
    assert ALLOWED[Phase.FAILED] == ALLOWED[Phase.STOPPED] == frozenset()
