"""The executor: one loop that turns what happens into policy events and carries out the
actions the policy returns. It decides nothing: every "if" about phases, failures, restarts,
reloads, GPU findings and timers is in policy.py.

Everything that happens arrives on one queue: signals (the handlers only enqueue, as in
gunicorn's arbiter), the child's exit (a waiter thread), probe and deep-check results (a
small thread pool: a hung server can never stall this loop or the watchdog), GPU findings
(the monitor's event thread), and "the server is up" from vLLM's output (the log pump's
reader thread). The loop blocks on the queue until the policy's next deadline, so a signal or
an exit wakes it at once and ticks still run on time.

About 540 lines: the loop, one case per action, and the I/O behind each (preflight, spawn,
probes, deep checks, config load, the gate's and the cluster agent's start); publishing, the
GPU adapter and the group protocol live in publish.py, gpuwatch.py and cluster/.

Collaborators are injected (clock, environment, notifier, spawner, GPU monitor factory,
jitter, logging setup), so tests construct the whole daemon in-process.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from nika_supervisor import command, probes, procs
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
    Log,
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
    Work,
)
from nika_supervisor.child import Child
from nika_supervisor.clock import Clock, MonotonicClock
from nika_supervisor.cluster import group
from nika_supervisor.cluster.agent import ClusterAgent
from nika_supervisor.cluster.bridge import group_text, node_event
from nika_supervisor.cluster.identity import node_identity
from nika_supervisor.cluster.token import Token
from nika_supervisor.config import Config, load_config
from nika_supervisor.diagnosis import Diagnoser
from nika_supervisor.errors import ConfigError, SpawnError
from nika_supervisor.events import (
    Boot,
    ChildExited,
    ConfigLoaded,
    ConfigRejected,
    Diagnosed,
    Drained,
    Event,
    Generated,
    GroupGone,
    LiveProbe,
    LoadStalled,
    MetricsRead,
    OutputDropped,
    PreflightResult,
    ReadyProbe,
    ReloadRequested,
    ServerUp,
    Spawned,
    SpawnFailed,
    StopRequested,
    Tick,
)
from nika_supervisor.exposition import GateReading
from nika_supervisor.failures import Failure
from nika_supervisor.gate import (
    GateBindError,
    GateDrained,
    GateEvent,
    GateExited,
    GateProcess,
    GateStarted,
    UpstreamView,
)
from nika_supervisor.gpu import GpuMonitor
from nika_supervisor.gpuwatch import GpuWatch, MonitorFactory
from nika_supervisor.history import default_state_dir
from nika_supervisor.lifecycle import State
from nika_supervisor.log import LEVELS, configure, get_logger, render_output
from nika_supervisor.metrics import parse_metrics
from nika_supervisor.notify import Notifier
from nika_supervisor.observe import Observer
from nika_supervisor.policy import Policy
from nika_supervisor.publish import Publisher, gate_view, status_text
from nika_supervisor.statefile import default_runtime_dir

DRAIN_WAIT_S = 0.1  # before a diagnosis, wait this long at most for the child's last lines
# vLLM's API server prints these once it accepts connections (uvicorn's startup lines).
SERVER_UP_MARKERS = ("Application startup complete", "Uvicorn running on")
CLUSTER_POLL_S = 2.0  # each node's poll of its peers' control endpoints (a small GET)

Spawner = Callable[..., Child]


@dataclass(frozen=True, slots=True)
class _Signal:
    signum: int


class Supervisor:
    def __init__(self, cfg: Config, *, clock: Clock | None = None,
                 environ: Mapping[str, str] | None = None,
                 notifier: Notifier | None = None, spawner: Spawner = Child.spawn,
                 gpu_factory: MonitorFactory = GpuMonitor,
                 jitter: Callable[[], float] = random.random,
                 configure_logging: Callable[[str, str], object] = configure,
                 observer: Observer | None = None) -> None:
        self.clock = clock or MonotonicClock()
        self.environ = dict(os.environ if environ is None else environ)
        self.notifier = notifier or Notifier(self.environ)
        self.log = get_logger()
        self.inbox: queue.SimpleQueue[Event | _Signal | GateEvent | group.Decision] = \
            queue.SimpleQueue()
        self.state = State()
        self.child: Child | None = None
        self.final: Exit | None = None
        self._spawner = spawner
        self._gpu_factory = gpu_factory
        self._configure_logging = configure_logging
        # Live probes overlap while a server hangs (timeout / interval of them), plus one
        # metrics read, one canary and one speed check.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._launch_env: Mapping[str, str] = {}  # what the current vLLM was started with
        self._dropped_seen = 0
        self._next_watchdog: float | None = None
        self.diagnoser = Diagnoser.load()
        self.gpu: GpuWatch | None = None
        self.gate: GateProcess | None = None
        self.agent: ClusterAgent | None = None
        self._identity: dict[str, str | None] = {}
        self._view: UpstreamView | None = None
        self.policy = Policy.from_config(cfg, jitter)
        # Load progress, the history and /metrics (issue 11): fed every event and output line.
        self.obs = observer or Observer(cfg, lambda event, level, **f: self._log(event, level, f))
        self._configure(cfg)
        self.publisher = Publisher(self.notifier, cfg.supervisor.runtime_dir
                                   or default_runtime_dir(self.environ), self.log)

    def _configure(self, cfg: Config) -> None:
        """The one owner of the running configuration: at start and on every good reload,
        each component gets its section here."""
        self.cfg = cfg
        self.policy = self.policy.with_config(cfg)
        self._target = probes.target(cfg.vllm.host, cfg.vllm.port)
        self._key = command.api_key(cfg)
        self._configure_logging(cfg.supervisor.log_format, cfg.supervisor.log_level)
        if self.gpu is not None:
            self.gpu.configure(cfg.gpu, cfg.vllm.env_dict)
        if self.agent is not None:
            self._refresh_identity()
            if cfg.cluster != self.agent.cfg:
                self.log.warning("cluster.restart_needed", reason="cluster: changed: the "
                                 "control endpoint and the group keep the old section until "
                                 "the unit restarts")
        if self.gate is not None and (cfg.gate is None or not self.gate.update(cfg)):
            self.log.warning("gate.restart_needed", reason="gate.listen changed or the gate "
                             "was turned off: bound sockets change only with a restart of "
                             "the unit")

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while self.final is None:
            self.step(self.timeout())
        return self.close()

    def start(self) -> None:
        self._install_signals()
        if self.notifier.watchdog_interval:
            self._next_watchdog = self.clock.now()
        self.log.info("supervisor.starting", pid=os.getpid(), config=self.cfg.path,
                      alias=self.cfg.vllm.alias, port=self.cfg.vllm.port,
                      entrypoint=self.cfg.vllm.entrypoint,
                      watchdog_s=self.notifier.watchdog_interval,
                      notify=self.notifier.enabled, runtime_dir=self.publisher.runtime_dir)
        budget = self.obs.start(self.clock.now())
        gate_failure = self._start_gate()
        cluster_failure = self._start_cluster()
        runs, finding = False, None
        if self.cfg.gpu.nvml != "off":
            self.gpu = GpuWatch(self.cfg.gpu, self.cfg.vllm.env_dict, self.inbox.put, self.log,
                                self._gpu_factory)
            runs, finding = self.gpu.start()
            if not runs:  # optional and unavailable: HTTP checks only
                self.gpu = None
        now = self.clock.now()
        self._feed(Boot(gpu=runs, gpu_finding=finding, gate_failure=gate_failure,
                        cluster_failure=cluster_failure,
                        restart_log=budget.restart_log(now), attempt=budget.attempt,
                        delay_s=budget.delay_s))

    def _start_gate(self) -> Failure | None:
        """Bind the public addresses once, for the daemon's whole life, and start the gate."""
        if self.cfg.gate is None:
            return None
        gate = GateProcess(self.cfg, emit=self.inbox.put, environ=self.environ,
                           metrics_url=self.obs.metrics_url())
        try:
            gate.bind()
        except GateBindError as e:
            return Failure(f"the gate cannot listen: {e.strerror}",
                           "another program holds the public address (ss -ltnp); stop it or "
                           "change gate.listen", code="gate.bind")
        gate.start()
        self.gate = gate
        self.obs.set_gate(lambda: GateReading(held=gate.stats.held,
                                              in_flight=gate.stats.in_flight))
        return None

    def _start_cluster(self) -> Failure | None:
        """With `cluster:`, start this node's side of the group protocol: the control endpoint
        on this node's cluster address, the poller, the group policy (cluster/agent.py)."""
        c = self.cfg.cluster
        if c is None:
            return None
        try:
            token = Token.from_file(c.token_file)
        except (OSError, ValueError) as e:
            return Failure(f"cannot read cluster.token_file {c.token_file}: "
                           f"{getattr(e, 'strerror', None) or e}",
                           "create it with the same secret on every node (README, Two "
                           "Sparks)", code="cluster.token")
        epoch_file = os.path.join(default_state_dir(self.cfg.supervisor.state_dir, self.environ),
                                  "cluster-epoch")
        try:
            agent = ClusterAgent(c, token, self.clock.now, poll_interval=CLUSTER_POLL_S,
                                 extra_status=self._cluster_extra, emit=self.inbox.put,
                                 epoch_file=epoch_file)
        except OSError as e:
            host, port = c.control_address
            return Failure(f"the cluster control endpoint cannot listen on {host}:{port}: "
                           f"{e.strerror}", "cluster.peers[node_rank] must be an address of "
                           "this node, and its port free (ss -ltnp)", code="cluster.bind")
        self.agent = agent.start()
        self._refresh_identity()
        return None

    def _refresh_identity(self) -> None:
        """The model and vLLM version GET /cluster/status reports, read off the loop (the
        version comes from vLLM's interpreter), at start and after each reload."""
        cfg = self.cfg
        threading.Thread(target=lambda: self._identity.update(node_identity(cfg)),
                         name="cluster-identity", daemon=True).start()

    def _cluster_extra(self) -> dict[str, object]:
        """What GET /cluster/status adds to the group view (doctor compares it across nodes)."""
        return {**self._identity, "pid": self.state.pid, "supervisor_phase": str(self.state.phase)}

    def timeout(self) -> float:
        """How long the loop may block: until the policy's next deadline, the watchdog or
        the STATUS refresh, at most 1 s."""
        now = self.clock.now()
        times = [self.policy.next_deadline(self.state), self._next_watchdog,
                 self.publisher.next_refresh]
        present = [t for t in times if t is not None]
        return min(max(min(present) - now, 0.0), 1.0) if present else 1.0

    def step(self, timeout: float) -> None:
        """One pass: wait for something (or a deadline), hand it to the policy, then tick."""
        try:
            item: Event | _Signal | GateEvent | group.Decision | None = \
                self.inbox.get(timeout=timeout)
        except queue.Empty:
            item = None
        match item:
            case None:
                pass
            case _Signal(signum=signal.SIGHUP):
                self._feed(ReloadRequested())
            case _Signal(signum=signum):
                self._feed(StopRequested(signal.Signals(signum).name))
            case GateDrained():
                self._feed(Drained(item.in_flight_left, item.waited_s, item.timed_out))
            case GateStarted() | GateExited():
                pass  # the gate logs these; it respawns itself on the same sockets
            case group.Note():
                self._log(item.event, item.level, dict(item.fields))
            case (group.RestartGroup() | group.StartRank() | group.StopRank()
                  | group.ReadyChanged() | group.AskGroupRestart()):
                ev = node_event(item)
                if ev is not None:
                    self._feed(ev)
            case _:
                self._feed(item)
        now = self.clock.now()
        if self._next_watchdog is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            assert self.notifier.watchdog_interval is not None
            self._next_watchdog = now + self.notifier.watchdog_interval
        stall = self.obs.tick(now)
        if stall is not None:  # the policy decides what it means in the current phase
            self._feed(LoadStalled(Failure(stall.cause, stall.hint, code=stall.code)))
        child = self.child
        if child is not None and child.pump.dropped > self._dropped_seen:
            count, self._dropped_seen = child.pump.dropped - self._dropped_seen, child.pump.dropped
            self._feed(OutputDropped(child.pid, count))
        self._feed(Tick())

    def _feed(self, ev: Event) -> None:
        pending: list[Event] = [ev]
        while pending and self.final is None:
            e = pending.pop(0)
            self.state, actions = self.policy.decide(self.state, e, self.clock.now())
            for a in actions:
                answer = self._execute(a)
                if answer is not None:
                    pending.append(answer)
        now = self.clock.now()
        group = self.agent.status() if self.agent is not None else None  # once per pass
        self.publisher.publish(self.state, self.cfg, now, self._gpu_text(group),
                               self.obs.loading_status(now),
                               self.gate.stats if self.gate is not None else None,
                               self.obs.loading_step(), group)
        if self.gate is not None:
            view = gate_view(self.state, self.cfg)
            if view != self._view:
                self._view = view
                self.gate.publish(view)

    def _execute(self, a: Action) -> Event | None:
        match a:
            case Log(event=event, level=level):
                self._log(event, level, a.as_dict())
            case Preflight():
                return self._preflight()
            case Spawn():
                return self._spawn()
            case SignalGroup(pgid=pgid, sig=sig):
                if not procs.signal_group(pgid, sig) and sig != signal.SIGCONT:
                    return GroupGone(pgid)
            case Drain(timeout=timeout):
                if self.gate is None:
                    return Drained()
                self.gate.drain(timeout)
            case CheckGroup(pgid=pgid):
                if not procs.group_members(pgid):
                    return GroupGone(pgid)
            case StartProbe(kind=kind, pid=pid):
                self._pool.submit(self._probe, kind, pid)
            case RunDeep(work=work):
                self._pool.submit(self._run_deep, work)
            case Diagnose():
                return self._diagnose(a)
            case SampleGpu(pgid=pgid):
                if self.gpu is not None:
                    return self.gpu.sample(pgid, self.clock.now())
            case LoadConfig():
                return self._load_config()
            case ApplyConfig(cfg=cfg):
                self._configure(cfg)
            case NotifyReady():
                self.notifier.ready(self.status_text())
            case NotifyReloading():
                self.notifier.reloading()
            case NotifyStopping():
                self.notifier.stopping(self.status_text())
            case ExtendTimeout(seconds=seconds):
                self.notifier.extend_timeout(seconds)
            case RankStarted(epoch=epoch) if self.agent is not None:
                self.agent.rank_started(epoch)
            case RankGone(cause=cause, epoch=epoch) if self.agent is not None:
                self.agent.rank_gone(cause, epoch)
            case AliasAnswered() if self.agent is not None:
                self.agent.alias_answered(True)
            case Exit():
                self.final = a
        return None

    # -- actions -----------------------------------------------------------------------------

    def _preflight(self) -> PreflightResult:
        marker = command.marker_value(self.cfg)
        orphans = procs.scan_marked(command.MARKER_ENV, marker)
        seen = {o.pid for o in orphans}
        orphans += [o for o in procs.recorded_group(self._group_record()) if o.pid not in seen]
        if orphans:
            self.log.warning("vllm.orphans_killed",
                             pids=[o.pid for o in orphans], names=[o.name for o in orphans],
                             hint="left by an earlier instance of this daemon")
            for o in orphans:
                procs.signal_pid(o.pid, signal.SIGKILL)
            return PreflightResult(orphans_pending=True)
        # A headless cluster worker listens on no API port.
        busy = (procs.port_holder(self.cfg.vllm.host, self.cfg.vllm.port)
                if command.serves_api(self.cfg) else None)
        if busy:
            return PreflightResult(blocked=Failure(
                busy, f"another program holds the port: ss -ltnp 'sport = :{self.cfg.vllm.port}'",
                code="port_busy"))
        if self.gpu is not None:
            return PreflightResult(blocked=self.gpu.refusal(command.MARKER_ENV, marker))
        return PreflightResult()

    def _spawn(self) -> Event:
        spec = command.build_launch(self.cfg, self.environ)
        self._launch_env = spec.env
        level = LEVELS[self.cfg.supervisor.log_level]
        self.diagnoser.reset()
        box: dict[str, int] = {}

        def tap(line: str) -> None:  # on the pump's reader thread
            self.diagnoser.feed(line)
            self.obs.on_output(line, self.clock.now())
            if "pid" in box and any(m in line for m in SERVER_UP_MARKERS):
                self.inbox.put(ServerUp(box["pid"]))

        try:
            child = self._spawner(
                spec, sink=lambda batch: render_output(batch, level),
                on_exit=lambda pid, rc, sig: self.inbox.put(ChildExited(pid, rc, sig)),
                tap=tap)
        except SpawnError as e:
            return SpawnFailed(Failure(str(e), "check vllm.python", code="spawn"))
        if self.child is not None:
            self.child.pump.close(timeout=0.1)
        self.child, box["pid"], self._dropped_seen = child, child.pid, 0
        procs.record_group(self._group_record(), child.pid)
        self._log("vllm.spawned", "info", {"pid": child.pid, "argv": list(spec.argv),
                                           "env": spec.redacted_added()})
        return Spawned(child.pid)

    def _group_record(self) -> str:
        """Where the current vLLM's process group is remembered for the next instance."""
        return os.path.join(self.publisher.runtime_dir, "vllm.pgid")

    def _diagnose(self, ask: Diagnose) -> Diagnosed:
        child = self.child
        if child is None or child.pid != ask.pid:
            return Diagnosed(ask, None)
        if ask.context == "exit":  # the last lines a dying server wrote explain its death
            child.pump.wait_drained(child.pump.pipes, DRAIN_WAIT_S)
        d = self.diagnoser.conclude(ask.returncode, ask.signal, during_startup=ask.loading)
        return Diagnosed(ask, None if d is None else d.failure)

    def _probe(self, kind: str, pid: int) -> None:
        timeout = self.cfg.health.timeout
        t0 = self.clock.now()
        if kind == "ready":
            out = probes.models(self._target, self.cfg.vllm.alias, self._key, min(timeout, 5.0))
            self.inbox.put(ReadyProbe(pid, out.ok, out.reason))
        else:
            out = probes.live(self._target, self.cfg.vllm.alias, self._key, timeout)
            self.inbox.put(LiveProbe(pid, out.ok, out.engine_dead, out.reason, out.probe))
        self.obs.on_probe(kind, out.ok, self.clock.now() - t0)

    def _run_deep(self, work: Work) -> None:
        """On a pool thread: the HTTP part of a deep check."""
        if work.kind == "metrics":
            text = probes.metrics_text(self._target, self.cfg.health.timeout)
            self.inbox.put(MetricsRead(work.pid, parse_metrics(text) if text else None))
        else:
            g = probes.complete(self._target, self.cfg.vllm.alias, self._key,
                                self.cfg.health.canary_timeout, max_tokens=work.max_tokens)
            self.inbox.put(Generated(work.pid, work.kind, g, self._launch_env,
                                     dict(self.cfg.vllm.args)))

    def _load_config(self) -> Event:
        try:
            new = load_config(self.cfg.path)
        except ConfigError as e:
            return ConfigRejected(tuple(str(i) for i in e.issues))
        return ConfigLoaded(new, new.launch_key() != self.cfg.launch_key())

    # -- status ------------------------------------------------------------------------------

    def _gpu_text(self, group: dict[str, Any] | None) -> str:
        """STATUS's extra parts: the GPU, the gate, the group (its view, read by the caller)."""
        parts = [self.gpu.status_text() if self.gpu is not None else ""]
        if self.gate is not None:
            g = self.gate.stats
            parts.append(f"gate: {g.in_flight} in flight, {g.held} held, {g.rejected} rejected")
        if group is not None:
            parts.append(group_text(group))
        return "; ".join(p for p in parts if p)

    def status_text(self) -> str:
        now = self.clock.now()
        group = self.agent.status() if self.agent is not None else None
        return status_text(self.state, self.cfg, now, self._gpu_text(group),
                           self.obs.loading_status(now))

    def _log(self, event: str, level: str, fields: dict[str, object]) -> None:
        """Every event the daemon decides or observes: the Observer (history, /metrics, load
        breakdown) sees it first and may add fields, then it is logged."""
        extra = self.obs.on_event(event, fields, self.clock.now())
        getattr(self.log, level)(event, **fields, **extra)

    # -- signals and shutdown ------------------------------------------------------------------

    def post_signal(self, signum: int) -> None:
        """What a signal handler does: record it. Tests call this directly."""
        self.inbox.put(_Signal(signum))  # SimpleQueue.put is reentrant: safe in a handler

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self.post_signal(signum))

    def close(self) -> int:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.gpu is not None:
            self.gpu.close()
        if self.child is not None:
            self.child.pump.close(timeout=1.0)
        if self.agent is not None:  # the head tells its workers their group is gone
            self.agent.stop()
        if self.gate is not None:  # last: the public sockets stay open until vLLM is gone
            self.gate.close()
        final = self.final or Exit(1)
        self._log("supervisor.stopped", "info", {"exit_code": final.code,
                                                 "restarts": final.restarts,
                                                 "reason": final.reason})
        self.obs.close(final.code, final.reason or "")
        return final.code


def run(cfg: Config) -> int:
    configure(cfg.supervisor.log_format, cfg.supervisor.log_level)
    return Supervisor(cfg).run()


__all__ = ["Supervisor", "run"]
