"""The executor: one loop that turns what happens into `policy` events and carries out the
actions the policy returns.

Everything that happens arrives on one queue: signals (the handlers only enqueue, as in
gunicorn's arbiter), the child's exit (a waiter thread), probe results (a small thread pool:
a hung server can never stall this loop or the watchdog), GPU findings (the monitor's
thread). The loop blocks on the queue with a timeout set by the next deadline, so a signal
or an exit wakes it at once and ticks still run on time.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from nika_supervisor import command, probes, procs
from nika_supervisor.child import Child
from nika_supervisor.clock import Clock, MonotonicClock
from nika_supervisor.config import Config, load_config
from nika_supervisor.deep import DeepChecks, Work
from nika_supervisor.diagnosis import Diagnoser, Diagnosis, Verdict
from nika_supervisor.durations import format_duration
from nika_supervisor.errors import ConfigError, SpawnError
from nika_supervisor.gpu import (
    FailureClass,
    GpuFinding,
    GpuMonitor,
    GpuSample,
    check_residency,
    residency_threshold,
)
from nika_supervisor.log import LEVELS, configure, get_logger, render_output
from nika_supervisor.metrics import (
    VllmMetrics,
    parse_metrics,
)
from nika_supervisor.notify import Notifier
from nika_supervisor.policy import (
    Action,
    Boot,
    ChildExited,
    Event,
    Exit,
    Failure,
    Fault,
    GroupGone,
    LiveProbe,
    Log,
    NotifyReady,
    NotifyStopping,
    Policy,
    Preflight,
    PreflightResult,
    ReadyProbe,
    RestartRequested,
    Severity,
    SignalGroup,
    Spawn,
    Spawned,
    SpawnFailed,
    StartProbe,
    State,
    StopRequested,
    Then,
    Tick,
)
from nika_supervisor.statefile import default_runtime_dir, write_state
from nika_supervisor.states import SERVING_PHASES, Phase

EXTEND_EVERY_S = 5.0  # while activating: EXTEND_TIMEOUT_USEC this often ...
EXTEND_BY_S = 20.0  # ... by this much, so a hung daemon still times out its start
STATUS_REFRESH_S = 5.0  # refresh elapsed times in STATUS while not ready ...
READY_STATUS_REFRESH_S = 60.0  # ... and the uptime while ready
GROUP_POLL_S = 0.05  # while STOPPING, look for survivors of the group this often
DRAIN_WAIT_S = 0.1  # at exit, wait this long at most for the child's last lines


@dataclass(frozen=True, slots=True)
class _Signal:
    signum: int


@dataclass(frozen=True, slots=True)
class _Exited:
    pid: int
    returncode: int | None
    signal: int | None


@dataclass(frozen=True, slots=True)
class _Metrics:
    pid: int
    metrics: VllmMetrics | None


@dataclass(frozen=True, slots=True)
class _Generated:
    pid: int
    purpose: str  # "canary" | "speed"
    result: probes.Generation


Inbox = Event | _Signal | _Exited | GpuFinding | _Metrics | _Generated


class Supervisor:
    def __init__(self, cfg: Config, *, clock: Clock | None = None,
                 environ: Mapping[str, str] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or MonotonicClock()
        self.environ = dict(os.environ if environ is None else environ)
        self.notifier = notifier or Notifier(self.environ)
        self.log = get_logger()
        self.inbox: queue.SimpleQueue[Inbox] = queue.SimpleQueue()
        self.policy = Policy(cfg.health, cfg.restart, jitter=random.random)
        self.state = State()
        self.child: Child | None = None
        self.exit_code: int | None = None
        self.ever_ready = False
        # A reload that restarts vLLM completes (READY=1) only when the new vLLM answers, so
        # that systemd shows "reloading", not "active", while the model is down.
        self._reload_pending = False
        self.config_error: str | None = None
        self.runtime_dir = cfg.supervisor.runtime_dir or default_runtime_dir(self.environ)
        # Live probes overlap while a server hangs (timeout / interval of them), plus one
        # metrics read, one canary and one speed check.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._target = probes.target(cfg.vllm.host, cfg.vllm.port)
        self._key = command.api_key(cfg)
        self._launch_env: Mapping[str, str] = {}  # what the current vLLM was started with
        self._next_watchdog: float | None = None
        self._next_extend = 0.0
        self._next_status = 0.0
        self._published: tuple[object, ...] = ()
        self.diagnoser = Diagnoser.load()
        self.deep = DeepChecks(cfg.health, self.log)
        self.gpu = (GpuMonitor(cfg.gpu, vllm_env=cfg.vllm.env_dict, emit=self.inbox.put)
                    if cfg.gpu.nvml != "off" else None)
        self.gpu_sample: GpuSample | None = None
        self._next_gpu_sample = 0.0
        self._next_gpu_log = 0.0
        self._residency: tuple[int, int | None] | None = None  # (pid, threshold bytes)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        now = self.clock.now()
        if self.notifier.watchdog_interval:
            self._next_watchdog = now
        self.log.info("supervisor.starting", pid=os.getpid(), config=self.cfg.path,
                      alias=self.cfg.vllm.alias, port=self.cfg.vllm.port,
                      entrypoint=self.cfg.vllm.entrypoint,
                      watchdog_s=self.notifier.watchdog_interval,
                      notify=self.notifier.enabled, runtime_dir=self.runtime_dir)
        if self.gpu is not None:
            finding = self.gpu.start()
            self.log.info("gpu.started", nvml=self.cfg.gpu.nvml, state=str(self.gpu.state),
                          devices=list(self.gpu.devices),
                          events=self.gpu.events_supported)
            if finding is not None:
                self._gpu_finding(finding)
            if self.gpu.state == "off":  # optional and unavailable: HTTP checks only
                self.gpu.close()
                self.gpu = None
        if self.exit_code is None:
            self._feed(Boot())
        while self.exit_code is None:
            try:
                item: Inbox | None = self.inbox.get(timeout=self._timeout())
            except queue.Empty:
                item = None
            self._handle(item)
            self._duties()
        self._shutdown()
        return self.exit_code

    def _timeout(self) -> float:
        now = self.clock.now()
        times = [self.policy.next_deadline(self.state), self._next_watchdog,
                 self._next_gpu_sample if self.gpu is not None else None,
                 self.deep.deadline() if self.state.phase in SERVING_PHASES else None,
                 self._next_extend if self._extending() else None,
                 self._next_status]
        if self.state.phase is Phase.STOPPING:
            times.append(now + GROUP_POLL_S)
        present = [t for t in times if t is not None]
        if not present:
            return 1.0
        return min(max(min(present) - now, 0.0), 1.0)

    def _extending(self) -> bool:
        """While systemd waits on us (start, a restarting reload, the final stop), keep its
        timeout alive; a daemon that hangs stops extending and times out (sd_notify(3))."""
        final_stop = self.state.phase is Phase.STOPPING and self.state.then is Then.EXIT
        return not self.ever_ready or self._reload_pending or final_stop

    def _handle(self, item: Inbox | None) -> None:
        match item:
            case None:
                pass  # a deadline passed: _duties() ticks the policy
            case _Signal(signum=signal.SIGHUP):
                self._reload()
            case _Signal(signum=signum):
                self.log.info("supervisor.stopping", signal=signal.Signals(signum).name)
                self._feed(StopRequested())
            case _Exited():
                self._feed(self._exit_event(item))
            case GpuFinding():
                self._gpu_finding(item)
            case LiveProbe():
                self._feed(self._handle_live(item))
            case _Metrics():
                self._on_metrics(item)
            case _Generated():
                self._on_generated(item)
            case _:
                self._feed(item)

    def _duties(self) -> None:
        """Work owed on every pass, whatever woke the loop."""
        now = self.clock.now()
        if self._next_watchdog is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            assert self.notifier.watchdog_interval is not None
            self._next_watchdog = now + self.notifier.watchdog_interval
        if self._extending() and now >= self._next_extend:
            self.notifier.extend_timeout(EXTEND_BY_S)
            self._next_extend = now + EXTEND_EVERY_S
        if self.state.phase is Phase.STOPPING and self.state.pid is not None \
                and not self.state.group_gone and not procs.group_members(self.state.pid):
            self._feed(GroupGone())
        if self.gpu is not None and now >= self._next_gpu_sample:
            self._sample_gpu(now)
        if self.state.phase in SERVING_PHASES and self.state.pid is not None:
            for work in self.deep.due(now, self.state.pid):
                self._pool.submit(self._run_deep, work)
        self._publish()
        self._feed(Tick())

    # -- policy ------------------------------------------------------------------------------

    def _feed(self, ev: Event) -> None:
        pending: list[Event] = [ev]
        while pending:
            e = pending.pop(0)
            self.state, actions = self.policy.decide(self.state, e, self.clock.now())
            for a in actions:
                result = self._execute(a)
                if result is not None:
                    pending.append(result)
        self._publish()

    def _execute(self, a: Action) -> Event | None:
        match a:
            case Log(event=event, level=level):
                getattr(self.log, level)(event, **a.as_dict())
            case Preflight():
                return self._preflight()
            case Spawn():
                return self._spawn()
            case SignalGroup(sig=sig):
                pgid = self.state.pid
                if pgid is None:
                    return GroupGone()
                self.log.info("vllm.signal", pgid=pgid, signal=signal.Signals(sig).name)
                if not procs.signal_group(pgid, sig):
                    return GroupGone()
                if sig == signal.SIGTERM:
                    # A stopped (SIGSTOPped, hung-in-T) process keeps SIGTERM pending until it
                    # runs again; systemd sends SIGCONT after its kill signal for the same
                    # reason (systemd.kill(5), KillSignal=).
                    procs.signal_group(pgid, signal.SIGCONT)
            case StartProbe(kind=kind, pid=pid):
                self._pool.submit(self._probe, kind, pid)
            case NotifyReady():
                self.ever_ready = True
                self._reload_pending = False
                self.notifier.ready(self.status_text())
            case NotifyStopping():
                self.notifier.stopping(self.status_text())
            case Exit(code=code):
                self.exit_code = code
        return None

    # -- actions -----------------------------------------------------------------------------

    def _preflight(self) -> PreflightResult:
        marker = command.marker_value(self.cfg)
        orphans = procs.scan_marked(command.MARKER_ENV, marker)
        if orphans:
            self.log.warning("vllm.orphans_killed",
                             pids=[o.pid for o in orphans], names=[o.name for o in orphans],
                             hint="left by an earlier instance of this daemon")
            for o in orphans:
                procs.signal_pid(o.pid, signal.SIGKILL)
            return PreflightResult(orphans_pending=True)
        busy = procs.port_holder(self.cfg.vllm.host, self.cfg.vllm.port)
        if busy:
            return PreflightResult(blocked=Failure(
                busy, f"another program holds the port: ss -ltnp 'sport = :{self.cfg.vllm.port}'",
                code="port_busy"))
        if self.gpu is not None:
            pf = self.gpu.preflight(command.MARKER_ENV, marker, own_pgid=None)
            if pf.foreign:
                self.log.warning("gpu.foreign_holders", holders=[h.describe() for h in pf.foreign],
                                 refused=pf.refuse_reason is not None)
            if pf.refuse_reason:
                return PreflightResult(blocked=Failure(
                    pf.refuse_reason, "end those processes, or set gpu.stale_holders: report",
                    code="gpu.foreign_holders"))
        return PreflightResult()

    def _spawn(self) -> Event:
        spec = command.build_launch(self.cfg, self.environ)
        self._launch_env = spec.env
        level = LEVELS[self.cfg.supervisor.log_level]
        self.diagnoser.reset()
        self.deep.reset()
        try:
            self.child = Child.spawn(
                spec, sink=lambda batch: render_output(batch, level),
                on_exit=lambda pid, rc, sig: self.inbox.put(_Exited(pid, rc, sig)),
                tap=self.diagnoser.feed)
        except SpawnError as e:
            return SpawnFailed(Failure(str(e), "check vllm.python", code="spawn"))
        self.log.info("vllm.spawned", pid=self.child.pid, argv=list(spec.argv),
                      env=spec.redacted_added())
        return Spawned(self.child.pid)

    def _exit_event(self, ex: _Exited) -> ChildExited:
        if self.child is None or self.child.pid != ex.pid:
            return ChildExited(ex.pid, ex.returncode, ex.signal, None)
        # The last lines a dying server wrote explain its death; let the readers catch up.
        self.child.pump.wait_drained(self.child.pump.pipes, DRAIN_WAIT_S)
        diagnosis = None
        if self.state.phase is not Phase.STOPPING:  # an exit we did not ask for
            diagnosis = self._diagnose(ex.returncode, ex.signal,
                                       during_startup=self.state.phase is Phase.LOADING)
        return ChildExited(ex.pid, ex.returncode, ex.signal, diagnosis)

    def _diagnose(self, returncode: int | None, sig: int | None,
                  during_startup: bool) -> Failure | None:
        d: Diagnosis | None = self.diagnoser.conclude(returncode, sig, during_startup)
        if d is None:
            return None
        # retry-after-cleanup: every restart here follows a cleanup of the whole group; the
        # diagnoser itself turns the same cause twice in a row into give-up.
        severity = Severity.MODEL if d.verdict is Verdict.GIVE_UP else Severity.RETRY
        return Failure(d.cause, d.hint, severity, d.id)

    def _probe(self, kind: str, pid: int) -> None:
        timeout = self.cfg.health.timeout
        if kind == "ready":
            out = probes.models(self._target, self.cfg.vllm.alias, self._key, min(timeout, 5.0))
            self.inbox.put(ReadyProbe(pid, out.ok, out.reason))
        else:
            out = probes.live(self._target, self.cfg.vllm.alias, self._key, timeout)
            self.inbox.put(LiveProbe(pid, out.ok, out.engine_dead, out.reason, out.probe))

    def _handle_live(self, ev: LiveProbe) -> LiveProbe:
        """An engine-dead answer gets the cause from vLLM's output, on the main thread."""
        if ev.engine_dead and ev.pid == self.state.pid:
            return replace(ev, diagnosis=self._diagnose(None, None, during_startup=False))
        return ev

    # -- deep liveness: /metrics stall rule, canary completion, slow mode ----------------------

    def _run_deep(self, work: Work) -> None:
        """On a pool thread: the HTTP part of a deep check."""
        if work.kind == "metrics":
            text = probes.metrics_text(self._target, self.cfg.health.timeout)
            self.inbox.put(_Metrics(work.pid, parse_metrics(text) if text else None))
        else:
            g = probes.complete(self._target, self.cfg.vllm.alias, self._key,
                                self.cfg.health.canary_timeout, max_tokens=work.max_tokens)
            self.inbox.put(_Generated(work.pid, work.kind, g))

    def _on_metrics(self, ev: _Metrics) -> None:
        self.deep.done("metrics")
        if ev.pid != self.state.pid or self.state.phase not in SERVING_PHASES:
            return
        failure, canary = self.deep.on_metrics(self.clock.now(), ev.pid, ev.metrics)
        if failure is not None:
            self._feed(Fault(failure))
        elif canary is not None:
            self._pool.submit(self._run_deep, canary)

    def _on_generated(self, ev: _Generated) -> None:
        self.deep.done(ev.purpose)
        if ev.pid != self.state.pid or self.state.phase not in SERVING_PHASES:
            return
        failure = self.deep.on_generated(ev.purpose, ev.result, self._launch_env,
                                         dict(self.cfg.vllm.args))
        if failure is not None:
            self._feed(Fault(failure))

    # -- GPU ---------------------------------------------------------------------------------

    def _gpu_finding(self, f: GpuFinding) -> None:
        """The GPU monitor's verdicts, mapped onto the policy (README.md, GPU health)."""
        if f.klass is FailureClass.WARN:
            self.log.warning("gpu.finding", **f.fields())
            return
        if f.klass is FailureClass.FATAL:
            self.log.critical("gpu.fatal", **f.fields())
            self._feed(Fault(Failure(f.reason, f.hint, Severity.GPU_FATAL, f.code)))
            return
        # RESTART: only about a vLLM that is running. Xids 43/45 also follow our own kill.
        if self.state.phase in (Phase.LOADING, Phase.READY, Phase.UNHEALTHY):
            self.log.error("gpu.finding", **f.fields())
            self._feed(Fault(Failure(f.reason, f.hint, Severity.RETRY, f.code)))
        else:
            self.log.info("gpu.finding_ignored", phase=str(self.state.phase), **f.fields())

    def _sample_gpu(self, now: float) -> None:
        """Sample every health.interval: findings and residency; log gpu.sample less often."""
        assert self.gpu is not None
        s = self.state
        pids = [p.pid for p in procs.group_members(s.pid)] if s.pid is not None else []
        sample = self.gpu.sample(pids, now)
        self.gpu_sample = sample
        self._next_gpu_sample = now + self.cfg.health.interval
        if now >= self._next_gpu_log:
            self._next_gpu_log = now + self.cfg.gpu.sample_interval
            self.log.info("gpu.sample", **sample.fields())
        for f in sample.findings:
            self._gpu_finding(f)
        if s.phase is Phase.READY and s.pid is not None and self.state.pid == s.pid:
            if self._residency is None or self._residency[0] != s.pid:
                threshold = residency_threshold(self.cfg.gpu.min_resident_memory,
                                                sample.vllm_resident_bytes)
                self._residency = (s.pid, threshold)
                if threshold is not None:
                    self.log.info("gpu.residency", pid=s.pid, held=sample.vllm_resident_bytes,
                                  min_resident=threshold)
            finding = check_residency(self._residency[1], sample.vllm_resident_bytes)
            if finding is not None:
                self._gpu_finding(finding)

    # -- reload ------------------------------------------------------------------------------

    def _reload(self) -> None:
        self.notifier.reloading()
        self.log.info("supervisor.reload_requested", config=self.cfg.path)
        try:
            new = load_config(self.cfg.path)
        except ConfigError as e:
            errors = [str(i) for i in e.issues]
            self.config_error = errors[0] + (f" (+{len(errors) - 1} more)" if len(errors) > 1
                                             else "")
            self.log.error("supervisor.reload_rejected", errors=errors,
                           hint="the running configuration stays in force")
        else:
            restart = new.launch_key() != self.cfg.launch_key()
            self.config_error = None
            self._apply(new)
            self.log.info("supervisor.reloaded", restart_vllm=restart)
            if restart and self.ever_ready and self.state.pid is not None:
                self._reload_pending = True  # READY=1 when the new vLLM answers
                self._next_extend = 0.0
            if restart:
                self._feed(RestartRequested("configuration changed"))
        self._publish(force=True)
        if self.ever_ready and not self._reload_pending:
            self.notifier.ready(self.status_text())

    def _apply(self, new: Config) -> None:
        self.cfg = new
        self.policy = replace(self.policy, health=new.health, restart=new.restart)
        self.deep.configure(new.health)
        self._target = probes.target(new.vllm.host, new.vllm.port)
        self._key = command.api_key(new)
        configure(new.supervisor.log_format, new.supervisor.log_level)

    # -- status ------------------------------------------------------------------------------

    def status_text(self) -> str:
        s, now, v = self.state, self.clock.now(), self.cfg.vllm
        parts = [f"{s.phase}: {v.alias} on {v.host}:{v.port}"]
        if s.phase is Phase.LOADING and s.spawned_at is not None:
            parts[0] += f" (loading {format_duration(now - s.spawned_at)})"
        elif s.phase in SERVING_PHASES and s.ready_at is not None:
            parts[0] += f" (up {format_duration(now - s.ready_at)})"
        elif s.phase is Phase.BACKOFF and s.wake_at is not None:
            parts[0] += f" (next start in {format_duration(max(0.0, s.wake_at - now))})"
        parts.append(f"restarts={s.restarts}")
        if self.gpu_sample is not None and self.gpu_sample.status_text():
            parts.append(self.gpu_sample.status_text())
        if s.last_failure is not None:
            parts.append(f"last failure: {s.last_failure.cause}")
        if self.config_error:
            parts.append(f"reload rejected: {self.config_error}")
        return "; ".join(parts)

    def state_record(self) -> dict[str, Any]:
        s = self.state
        f = s.last_failure
        wall = time.time() - (self.clock.now() - s.since)
        return {
            "phase": str(s.phase), "pid": s.pid, "supervisor_pid": os.getpid(),
            "alias": self.cfg.vllm.alias, "host": self.cfg.vllm.host, "port": self.cfg.vllm.port,
            "since": round(wall, 3), "restarts": s.restarts,
            "last_failure": None if f is None else {"cause": f.cause, "hint": f.hint,
                                                   "code": f.code, "severity": str(f.severity)},
            "config": self.cfg.path, "config_error": self.config_error,
            "status": self.status_text(),
        }

    def _publish(self, force: bool = False) -> None:
        """STATUS= when its text changes (elapsed times refresh every few seconds); the state
        file when anything but elapsed time changes."""
        now = self.clock.now()
        s = self.state
        key = (s.phase, s.pid, s.restarts, s.last_failure, self.config_error)
        changed = key != self._published
        if not (changed or force or now >= self._next_status):
            return
        self._next_status = now + (STATUS_REFRESH_S if s.phase is not Phase.READY
                                   else READY_STATUS_REFRESH_S)
        self.notifier.status(self.status_text())
        if not (changed or force):
            return
        self._published = key
        try:
            write_state(self.runtime_dir, self.state_record())
        except OSError as e:
            self.log.warning("supervisor.state_write_failed", dir=self.runtime_dir,
                             error=e.strerror)

    # -- signals and shutdown ------------------------------------------------------------------

    def _install_signals(self) -> None:
        def record(signum: int, _frame: object) -> None:
            self.inbox.put(_Signal(signum))  # SimpleQueue.put is reentrant: safe here

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, record)

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.gpu is not None:
            self.gpu.close()
        if self.child is not None:
            self.child.pump.close(timeout=1.0)
        self.log.info("supervisor.stopped", exit_code=self.exit_code, restarts=self.state.restarts,
                      reason=self.state.last_failure.cause if self.state.last_failure else None)


def run(cfg: Config) -> int:
    configure(cfg.supervisor.log_format, cfg.supervisor.log_level)
    return Supervisor(cfg).run()

