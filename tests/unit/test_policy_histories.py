"""The decisions that used to live in the executor, now in the policy, each pinned by a
scripted history (injected clock, no processes): "the server is up", reload, GPU findings by
severity and phase, residency, timers (EXTEND_TIMEOUT, group polling, GPU sampling), deep
checks, dropped output, and the invariants (allowed moves, one give-up, bounded state)."""

from __future__ import annotations

import random
import signal
from dataclasses import replace

from test_policy import HEALTH, RESTART, Run

from nika_supervisor.actions import (
    ApplyConfig,
    CheckGroup,
    Diagnose,
    Drain,
    Exit,
    ExtendTimeout,
    LoadConfig,
    NotifyReady,
    NotifyReloading,
    RunDeep,
    SampleGpu,
    SignalGroup,
    StartProbe,
    Work,
)
from nika_supervisor.config import Config, GateConfig, GpuConfig, VllmConfig
from nika_supervisor.events import (
    Boot,
    ChildExited,
    ConfigLoaded,
    ConfigRejected,
    Drained,
    GpuReport,
    GpuSampled,
    GroupGone,
    LiveProbe,
    MetricsRead,
    OutputDropped,
    PreflightResult,
    ReadyProbe,
    ReloadRequested,
    ServerUp,
    Spawned,
    StopRequested,
    Tick,
)
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.failures import Failure, Severity
from nika_supervisor.lifecycle import Serving
from nika_supervisor.metrics import VllmMetrics
from nika_supervisor.policy import (
    DRAIN_GRACE_S,
    EXTEND_EVERY_S,
    FAST_POLL_FOR_S,
    FAST_POLL_S,
    GROUP_POLL_S,
    READY_POLL_S,
    Policy,
)
from nika_supervisor.states import ALLOWED, Phase

GiB = 1024**3


def gpu_run(**gpu: object) -> Run:
    r = Run()
    r.policy = Policy(HEALTH, RESTART, GpuConfig(**gpu), jitter=lambda: 0.0)  # type: ignore[arg-type]
    return r


def cfg(**health: float) -> Config:
    return Config("/etc/nika/nika-vllm.yaml", VllmConfig(model="/m"),
                  health=replace(HEALTH, **health), restart=RESTART)


# -- readiness ---------------------------------------------------------------------------


def test_server_up_line_probes_at_once() -> None:
    """vLLM's "Application startup complete" (ServerUp) starts a readiness probe at once,
    not at the next 0.25 s poll; one that comes while a probe is out queues exactly one more
    right after it."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(7))
    assert r.feed(ServerUp(7), after=0.01) == [r.actions[-2], StartProbe("ready", 7)]
    assert StartProbe("ready", 7) not in r.feed(ServerUp(7))  # one in flight: queued
    assert r.feed(ReadyProbe(7, False), after=0.02)[-1] == StartProbe("ready", 7)
    acts = r.feed(ReadyProbe(7, True), after=0.003)
    assert NotifyReady() in acts and r.state.phase is Phase.READY
    assert r.feed(ServerUp(6)) == []  # an old vLLM's line


def test_after_server_up_a_not_listed_alias_is_polled_fast_for_a_while() -> None:
    """Up but not listing the alias yet: poll every FAST_POLL_S for FAST_POLL_FOR_S after
    ServerUp, then fall back to READY_POLL_S (the ready lag stays small without polling
    fast for a whole 10-minute load)."""
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(7))
    r.feed(Tick())
    r.feed(ReadyProbe(7, False), after=0.01)
    assert r.state.rec.next_probe_at == r.clock.t + READY_POLL_S  # type: ignore[union-attr]
    r.feed(ServerUp(7), after=0.1)
    r.feed(ReadyProbe(7, False), after=0.01)
    assert r.state.rec.next_probe_at == r.clock.t + FAST_POLL_S  # type: ignore[union-attr]
    r.feed(Tick(), after=FAST_POLL_FOR_S)
    r.feed(ReadyProbe(7, False), after=0.01)
    assert r.state.rec.next_probe_at == r.clock.t + READY_POLL_S  # type: ignore[union-attr]


# -- reload ------------------------------------------------------------------------------


def test_rejected_reload_keeps_running_and_says_why() -> None:
    """RELOADING=1, then the file is read; a bad one keeps everything and READY=1 follows."""
    r = Run()
    r.start_ready()
    assert r.feed(ReloadRequested())[0::2] == [NotifyReloading(), LoadConfig()]
    acts = r.feed(ConfigRejected(("a.yaml:3:5: bad", "a.yaml:4:1: worse")))
    assert NotifyReady() in acts and r.state.phase is Phase.READY
    assert r.life.config_error == "a.yaml:3:5: bad (+1 more)"
    assert SignalGroup(100, signal.SIGTERM) not in acts


def test_reload_without_launch_change_applies_in_place() -> None:
    """A new health section reaches the policy itself: the next probe uses the new interval."""
    r = Run()
    r.start_ready()
    new = cfg(interval=1.0)
    acts = r.feed(ConfigLoaded(new, launch_changed=False))
    assert ApplyConfig(new) in acts and NotifyReady() in acts
    r.policy = r.policy.with_config(new)  # what the executor does on ApplyConfig
    assert r.policy.health.interval == 1.0
    assert r.state.phase is Phase.READY and not r.life.reload_pending


def test_reload_with_launch_change_completes_when_the_new_vllm_answers() -> None:
    """A launch change stops the old vLLM (no backoff, no budget); READY=1 comes only with the
    new one, and EXTEND_TIMEOUT keeps systemd's reload job alive meanwhile."""
    r = Run()
    r.start_ready()
    acts = r.feed(ConfigLoaded(cfg(), launch_changed=True))
    assert NotifyReady() not in acts and SignalGroup(100, signal.SIGTERM) in acts
    assert r.life.reload_pending and ExtendTimeout(20.0) in r.tick_until(r.clock.t + 0.1)
    r.feed(ChildExited(100, None, signal.SIGTERM))
    r.feed(GroupGone(100))
    assert r.state.phase is Phase.STARTING and r.life.restarts == 0
    r.feed(PreflightResult())
    r.feed(Spawned(101))
    assert NotifyReady() in r.feed(ReadyProbe(101, True))
    assert not r.life.reload_pending


# -- the GPU -----------------------------------------------------------------------------


def test_gpu_findings_by_severity_and_phase() -> None:
    """WARN: logged, vLLM serves on. RETRY: a restart while vLLM runs, ignored (logged)
    while none does, e.g. Xid 43 after our own kill. GPU_FATAL: exit 80 from any phase."""
    r = Run()
    r.start_ready()
    warm = Failure("GPU 0 at 90C", severity=Severity.WARN, code="gpu.hot")
    assert r.feed(GpuReport(warm))[0].event == "gpu.finding"  # type: ignore[union-attr]
    assert r.state.phase is Phase.READY
    r.feed(ChildExited(100, 1, None))
    r.feed(GroupGone(100))
    assert r.state.phase is Phase.BACKOFF
    r.feed(GpuReport(Failure("Xid 43", code="xid.43")))
    assert r.events("gpu.finding_ignored")[0]["phase"] == "backoff"
    assert r.state.phase is Phase.BACKOFF


def test_fatal_gpu_at_boot_exits_80_without_a_start() -> None:
    r = Run()
    acts = r.feed(Boot(gpu=True, gpu_finding=Failure("GPU lost", severity=Severity.GPU_FATAL,
                                                     code="nvml.gpu_lost")))
    assert Exit(ExitCode.GPU_FATAL) in acts and r.state.phase is Phase.FAILED
    assert r.phases() == [("starting", "failed")]


def test_finding_while_loading_restarts() -> None:
    r = Run()
    r.feed(Boot(gpu=True))
    r.feed(PreflightResult())
    r.feed(Spawned(5))
    acts = r.feed(GpuReport(Failure("Xid 13", code="xid.13")))
    assert SignalGroup(5, signal.SIGTERM) in acts and r.life.last_failure is not None


def test_fatal_gpu_during_a_restart_stop_exits_80() -> None:
    r = Run()
    r.start_ready()
    r.feed(ChildExited(100, 1, None))
    assert r.state.phase is Phase.STOPPING
    r.feed(GpuReport(Failure("Xid 79", severity=Severity.GPU_FATAL, code="xid.79")))
    assert Exit(ExitCode.GPU_FATAL) in r.feed(GroupGone(100))


def test_residency_floor_from_the_first_sample_after_ready() -> None:
    """auto: half of what the group held at the first sample after READY; less later is a
    restart (gpu.not_resident). Samples of another pid are not about this vLLM."""
    r = gpu_run()
    r.start_ready()
    r.feed(GpuSampled(100, 40 * GiB))
    assert r.events("gpu.residency")[0]["min_resident"] == 20 * GiB
    assert isinstance(r.state.rec, Serving) and r.state.rec.residency == 20 * GiB
    r.feed(GpuSampled(99, 0))
    assert r.state.phase is Phase.READY
    acts = r.feed(GpuSampled(100, 1 * GiB))
    assert SignalGroup(100, signal.SIGTERM) in acts
    assert r.life.last_failure is not None and r.life.last_failure.code == "gpu.not_resident"


def test_gpu_sampled_every_interval_and_logged_every_sample_interval() -> None:
    r = gpu_run(sample_interval=30.0)
    r.feed(Boot(gpu=True))
    t0 = r.clock.t
    samples = []
    for i in range(26):
        r.clock.t = t0 + 2.5 * i
        if any(isinstance(a, SampleGpu) for a in r.feed(Tick())):
            samples.append(r.clock.t - t0)
            r.feed(GpuSampled(None, None, fields={"nvml": "up"}))
    assert samples == [5.0 * k for k in range(13)]
    assert len(r.events("gpu.sample")) == 3  # t0, t0+30, t0+60


# -- timers ------------------------------------------------------------------------------


def test_extend_timeout_only_while_systemd_waits() -> None:
    r = Run()
    r.feed(Boot())
    r.feed(PreflightResult())
    r.feed(Spawned(1))
    extends = [a for a in r.tick_until(r.clock.t + 3 * EXTEND_EVERY_S)
               if isinstance(a, ExtendTimeout)]
    assert len(extends) >= 3
    r.feed(ReadyProbe(1, True))
    assert not any(isinstance(a, ExtendTimeout) for a in r.tick_until(r.clock.t + 60))
    r.feed(StopRequested())
    assert any(isinstance(a, ExtendTimeout) for a in r.tick_until(r.clock.t + 6))


def test_stop_sends_sigcont_and_polls_the_group() -> None:
    """SIGTERM then SIGCONT (a stopped process keeps SIGTERM pending); the group is checked
    every GROUP_POLL_S until it is gone."""
    r = Run()
    r.start_ready()
    acts = r.feed(StopRequested())
    sigs = [a for a in acts if isinstance(a, SignalGroup)]
    assert sigs == [SignalGroup(100, signal.SIGTERM), SignalGroup(100, signal.SIGCONT)]
    checks = [a for a in r.tick_until(r.clock.t + 10 * GROUP_POLL_S) if isinstance(a, CheckGroup)]
    assert 9 <= len(checks) <= 11


# -- deep checks and output ------------------------------------------------------------------


def test_stall_seen_in_metrics_restarts() -> None:
    r = Run(health=replace(HEALTH, stall_after=10.0, canary_interval=0.0))
    r.start_ready()
    busy = VllmMetrics(running=1, waiting=0, generation_tokens=5)
    assert RunDeep(Work("metrics", 100)) in r.feed(Tick())
    r.feed(MetricsRead(100, busy))
    r.feed(MetricsRead(100, busy), after=10.0)
    assert r.life.last_failure is not None and r.life.last_failure.code == "stall"
    assert r.events("stall.detected") and r.events("vllm.fault")


def test_engine_dead_asks_the_diagnoser_and_names_its_cause() -> None:
    r = Run()
    r.start_ready()
    r.diagnosis = Failure("CUDA out of memory", "lower gpu-memory-utilization", code="cuda_oom")
    acts = r.feed(LiveProbe(100, False, engine_dead=True, reason="/health answered 503"))
    assert Diagnose(100, "engine_dead", reason="/health answered 503") in acts
    assert r.life.last_failure is not None
    assert r.life.last_failure.cause == "engine dead (/health answered 503): CUDA out of memory"


def test_dropped_output_is_reported_at_most_once_a_minute() -> None:
    r = Run()
    r.start_ready()
    r.feed(OutputDropped(100, 5))
    r.feed(OutputDropped(100, 7), after=1.0)
    assert [e["lines"] for e in r.events("vllm.output_dropped")] == [5]
    r.tick_until(r.clock.t + 60.0)
    assert [e["lines"] for e in r.events("vllm.output_dropped")] == [5, 7]
    assert r.life.dropped_lines == 12


# -- invariants over long random histories ---------------------------------------------------


def test_random_histories_keep_the_invariants() -> None:
    """Thousands of random events: every move is allowed, every non-zero Exit follows exactly
    one supervisor.gave_up, the restart log stays within max_restarts, and after a Tick the
    next deadline is always in the future (the loop can never spin)."""
    rng = random.Random(9)
    for _ in range(40):
        r = Run()
        r.feed(Boot())
        pid = 100
        for _ in range(150):
            if r.state.phase in (Phase.FAILED, Phase.STOPPED):
                break
            cur = r.state.pid or pid
            ev = rng.choice([
                Tick(), PreflightResult(), Spawned(pid + 1), ReadyProbe(cur, rng.random() < .5),
                LiveProbe(cur, rng.random() < .7), ChildExited(cur, 1, None), GroupGone(cur),
                GpuReport(Failure("x", code="xid.13")), ServerUp(cur),
                ConfigLoaded(cfg(), launch_changed=rng.random() < .5), ConfigRejected(("e",)),
                StopRequested() if rng.random() < .05 else Tick(),
            ])
            if isinstance(ev, Spawned):
                pid += 1
            r.feed(ev, after=rng.choice([0.0, 0.1, 1.0, 7.0, 40.0]))
            assert len(r.life.restart_log) <= RESTART.max_restarts
            # no busy loop: once ticked, the next deadline is in the future
            r.feed(Tick())
            nxt = r.policy.next_deadline(r.state)
            assert nxt is None or nxt > r.clock.t, (r.state, nxt)
        for a, b in r.phases():
            assert Phase(b) in ALLOWED[Phase(a)]
        exits = [a for a in r.actions if isinstance(a, Exit)]
        assert len(exits) <= 1
        if exits and exits[0].code != 0:
            assert len(r.events("supervisor.gave_up")) == 1


# -- the gate: drain before a planned stop -------------------------------------------------


def gated_run() -> Run:
    r = Run()
    r.policy = replace(r.policy, drain_timeout=60.0)
    return r


def test_planned_restart_drains_before_signalling() -> None:
    """With the gate on, a reload's restart and a stop first drain: no SIGTERM until the gate
    says nothing is in flight (Drained), then the usual stop."""
    r = gated_run()
    r.start_ready()
    acts = r.feed(ConfigLoaded(replace(cfg(), gate=GateConfig(drain_timeout=60.0)),
                               launch_changed=True))
    assert Drain(100, 60.0) in acts and SignalGroup(100, signal.SIGTERM) not in acts
    assert r.state.phase is Phase.STOPPING
    assert not any(isinstance(a, SignalGroup) for a in r.tick_until(r.clock.t + 30.0))
    acts = r.feed(Drained(in_flight_left=0, waited_s=2.5))
    assert SignalGroup(100, signal.SIGTERM) in acts


def test_drain_has_a_backstop_and_failures_do_not_drain() -> None:
    """No answer from the gate: SIGTERM after drain_timeout + grace. A crash or a fault is
    not planned: vLLM is broken, so it is signalled at once."""
    r = gated_run()
    r.start_ready()
    t0 = r.clock.t
    r.feed(StopRequested())
    acts = r.tick_until(t0 + 60.0 + DRAIN_GRACE_S)
    assert SignalGroup(100, signal.SIGTERM) in acts
    assert r.events("gate.drain_unanswered")[0]["waited_s"] == 60.0 + DRAIN_GRACE_S
    r2 = gated_run()
    r2.start_ready()
    acts = r2.feed(GpuReport(Failure("Xid 13", code="xid.13")))
    assert SignalGroup(100, signal.SIGTERM) in acts and not any(isinstance(a, Drain)
                                                                for a in acts)


def test_vllm_dying_while_draining_ends_the_drain() -> None:
    r = gated_run()
    r.start_ready()
    r.feed(StopRequested())
    acts = r.feed(ChildExited(100, 1, None))
    assert SignalGroup(100, signal.SIGTERM) in acts  # the rest of the group
    assert Exit(ExitCode.OK) in r.feed(GroupGone(100))
