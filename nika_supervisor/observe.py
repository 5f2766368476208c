"""The executor's one adapter to issue 11's parts: load progress, the history, /metrics.

The executor hands it what it already has, and asks it three things:

    obs = Observer(cfg, log)                       # at daemon start
    budget = obs.start(now)                        # history read back; /metrics listening
    extra = obs.on_event(name, fields, now)        # before logging each event: fields to add
    obs.on_output(line, now)                       # every vLLM output line (the pump's tap)
    obs.on_probe(kind, ok, seconds)                # each probe result, with its latency
    obs.set_gate(lambda: GateReading(...))         # the gate, when on; its /metrics serves
    obs.exposition.render()                        # ... this (in a thread: it may wait 2 s)
    stall = obs.tick(now)                          # every loop pass: a Stall -> a fault
    obs.loading_status(now)                        # STATUS text while loading
    obs.close(exit_code, reason)                   # at daemon exit

Events are matched by their stable names (README "Logs") and fields, so this module knows
nothing of the policy's types. `now` is the executor's monotonic clock; history records carry
wall-clock time (`wall`). Thread-safety: `on_output` runs on the pump's reader thread and
`on_probe` on probe threads; both only touch state under the lock.

Past 300 lines because it is the one seam between the executor and three modules: the event
mapping is one `match` on the event names, kept in one place so that README's event table and
what reaches the history and /metrics can be compared at a glance.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nika_supervisor import exposition as ex
from nika_supervisor.config import Config
from nika_supervisor.history import (
    EVENT_BUDGET,
    EVENT_WRITE_FAILED,
    BootBudget,
    History,
    boot_budget,
    default_state_dir,
    launch_fingerprint,
)
from nika_supervisor.loadprogress import (
    EVENT_PROGRESS,
    EVENT_STALLED,
    STALL_HINT,
    LoadProgress,
)

GIB = 1024**3
MAX_STEPS = 1000  # progress steps queued between two ticks (a shard each, at most)
LogFn = Callable[..., None]  # log(event, level, **fields)
# A restart's cause code when restart.scheduled does not carry one: the event that preceded it.
_CODE_OF = {"health.failed": "health", "canary.failed": "canary", "stall.detected": "stall",
            EVENT_STALLED: "load_stall"}


@dataclass(frozen=True, slots=True)
class Stall:
    """The load stalled: feed the policy a fault with this cause (code `load_stall`)."""

    cause: str
    hint: str = STALL_HINT
    code: str = "load_stall"


@dataclass(slots=True)
class _Counts:
    vllm_starts: int = 0
    restarts: Counter[str] = field(default_factory=Counter)
    give_ups: int = 0
    last_give_up: tuple[int, float] | None = None
    load: ex.Histogram = field(default_factory=lambda: ex.Histogram(ex.LOAD_BUCKETS))
    last_load_s: float | None = None
    probes: dict[str, ex.Histogram] = field(default_factory=dict)
    results: Counter[tuple[str, str]] = field(default_factory=Counter)
    xid: Counter[int] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)
    gpu_fatal: bool = False
    gpus: tuple[ex.GpuReading, ...] = ()
    resident: int | None = None
    dropped: int = 0


class Observer:
    def __init__(self, cfg: Config, log: LogFn | None = None, *,
                 wall: Callable[[], float] = time.time, history: History | None = None,
                 vllm_version: str = "") -> None:
        self.cfg = cfg
        self.log: LogFn = log if log is not None else (lambda *a, **k: None)
        self.wall = wall
        self.history = history or History(default_state_dir(cfg.supervisor.state_dir),
                                          wall=wall)
        self.server: ex.MetricsServer | None = None
        v = cfg.vllm
        host = "127.0.0.1" if v.host in ("0.0.0.0", "::", "") else v.host
        host = f"[{host}]" if ":" in host else host
        # What /metrics answers: served by `server` (supervisor.metrics_listen) and/or by the
        # gate's own /metrics (gate code calls `exposition.render()` in a thread).
        self.exposition = ex.Exposition(f"http://{host}:{v.port}/metrics")
        self.vllm_version = vllm_version
        self._lock = threading.Lock()
        self._c = _Counts()
        self._progress: LoadProgress | None = None
        self._steps: list[dict[str, Any]] = []  # progress steps not logged yet
        self._phase = "starting"
        self._ready_since: float | None = None  # wall clock
        self._budget = BootBudget()
        self._window: list[float] = []  # wall times of restarts within restart.window
        self._last_code = ""
        self._history_errors_logged = False
        self._closed = False

    # -- start and stop ---------------------------------------------------------------------

    def start(self, now: float) -> BootBudget:
        """Read the budget back from the history, record this start, listen for scrapes."""
        wall = self.wall()
        records = self.history.read()
        launch = launch_fingerprint(self.cfg.vllm)
        self._budget = boot_budget(records, wall, self.cfg.restart, launch=launch)
        self._window = [wall - a for a in self._budget.restart_ages]
        self._c.give_ups = sum(1 for r in records if r["kind"] == "give_up")
        last = next((r for r in reversed(records) if r["kind"] == "give_up"), None)
        if last is not None:
            self._c.last_give_up = (int(last.get("code", 0)), float(last["t"]))
        self._record("daemon.start", pid=os.getpid(), config=self.cfg.path, launch=launch)
        if self._budget.carried:
            self.log(EVENT_BUDGET, "warning" if self._budget.delay_s else "info",
                     restarts_in_window=len(self._budget.restart_ages),
                     attempt=self._budget.attempt, delay_s=self._budget.delay_s,
                     last_cause=self._budget.last_cause, detail=self._budget.describe())
        listen = self.cfg.supervisor.metrics_listen
        if listen is not None:
            try:
                self.server = ex.MetricsServer(listen, exposition=self.exposition).start()
                self.log(ex.EVENT_LISTENING, "info", host=listen[0], port=self.server.port)
            except OSError as e:
                self.log(ex.EVENT_FAILED, "error", host=listen[0], port=listen[1],
                         error=e.strerror or str(e))
        self._publish()
        return self._budget

    def metrics_url(self) -> str:
        """Where this daemon's /metrics answers: supervisor.metrics_listen, or else a private
        loopback port started now (the gate's /metrics reads it)."""
        if self.server is None:
            self.server = ex.MetricsServer(("127.0.0.1", 0), exposition=self.exposition).start()
            self.log(ex.EVENT_LISTENING, "info", host="127.0.0.1", port=self.server.port)
        listen = self.cfg.supervisor.metrics_listen
        host = listen[0] if listen is not None else "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server.port}/metrics"

    def close(self, exit_code: int, reason: str = "") -> None:
        """Record the exit (once) and stop serving /metrics."""
        if self._closed:
            return
        self._closed = True
        self._record("daemon.exit", code=int(exit_code), reason=reason)
        if self.server is not None:
            self.server.stop()

    # -- what the executor feeds ------------------------------------------------------------

    def on_event(self, event: str, fields: Mapping[str, Any], now: float) -> dict[str, Any]:
        """Every event the daemon logs, before it is logged; returns fields to add to it."""
        f, c, extra = fields, self._c, {}
        match event:
            case "phase.changed":
                to = str(f.get("to", ""))
                self._record("phase", **{"from": f.get("from"), "to": to,
                                         "reason": f.get("reason", "")})
                if to == "loading" and self._progress is None:
                    self._spawned(None, now)  # vllm.spawned was not passed on: start here
                elif to in ("starting", "stopping", "backoff", "failed", "stopped"):
                    with self._lock:  # a load that ended without vllm.ready
                        self._progress = None
                if to == "ready" and self._phase != "unhealthy":
                    self._ready_since = self.wall()
                elif to not in ("ready", "unhealthy"):
                    self._ready_since = None
                self._phase = to
            case "vllm.spawned":
                self._spawned(f.get("pid"), now)
            case "vllm.ready":
                with self._lock:
                    progress, self._progress = self._progress, None
                load_s = float(f.get("load_s") or (progress and now - progress.started_at) or 0)
                extra = progress.breakdown(now) if progress is not None else {}
                extra.pop("load_s", None)
                c.load, c.last_load_s = c.load.observe(load_s), load_s
                self._record("load", load_s=load_s, **extra)
            case "vllm.fault":
                self._last_code = str(f.get("code") or "")
            case "vllm.exited" if not f.get("requested"):
                self._last_code = str(f.get("diagnosis") or "exit")
            case "restart.scheduled":
                code = str(f.get("code") or self._last_code or "other")
                c.restarts[code] += 1
                wall = self.wall()
                self._window = [t for t in self._window
                                if wall - t < self.cfg.restart.window] + [wall]
                self._record("restart", code=code, cause=f.get("reason", ""),
                             delay_s=f.get("delay_s"), attempt=f.get("attempt"))
            case "restart.backoff_reset":
                self._record("backoff_reset", healthy_s=f.get("healthy_s"))
            case "supervisor.gave_up":
                c.give_ups += 1
                c.last_give_up = (int(f.get("code", 0)), self.wall())
                self._record("give_up", code=int(f.get("code", 0)), reason=f.get("reason", ""),
                             cause_code=str(f.get("cause_code") or self._last_code))
            case "gpu.finding" | "gpu.fatal":
                code = str(f.get("code", ""))
                c.findings[code] += 1
                if code.startswith("xid.") and code[4:].isdigit():
                    c.xid[int(code[4:])] += 1
                if event == "gpu.fatal":
                    c.gpu_fatal = True
                self._last_code = code or self._last_code
                self._record("gpu.finding", code=code, cls=f.get("class"),
                             detail=f.get("reason", ""), device=f.get("device"))
            case "gpu.sample":
                self._gpu_sample(f)
            case "vllm.output_dropped":
                c.dropped = int(f.get("total", c.dropped))
            case "supervisor.stopped":
                self.close(int(f.get("exit_code", 0)), str(f.get("reason", "")))
        if event in _CODE_OF:
            engine_dead = event == "health.failed" and f.get("engine_dead")
            self._last_code = "engine_dead" if engine_dead else _CODE_OF[event]
        if event in ("canary.ok", "canary.failed"):
            self.on_probe("canary", event == "canary.ok", f.get("seconds"))
        self._publish(now)
        return extra

    def on_output(self, line: str, now: float) -> None:
        with self._lock:
            p = self._progress
            if p is None:
                return
            q = self._progress = p.feed(line, now)
            if (q.phase, q.shards) != (p.phase, p.shards) and len(self._steps) < MAX_STEPS:
                self._steps.append({
                    "step": q.phase, "shards_done": q.shards[0] if q.shards else None,
                    "shards_total": q.shards[1] if q.shards else None,
                    "elapsed_s": round(now - q.started_at, 1), "status": q.status(now)})

    def on_probe(self, kind: str, ok: bool, seconds: float | None = None) -> None:
        with self._lock:
            self._c.results[(kind, "ok" if ok else "fail")] += 1
            if seconds is not None:
                h = self._c.probes.get(kind) or ex.Histogram(ex.PROBE_BUCKETS)
                self._c.probes[kind] = h.observe(float(seconds))

    def tick(self, now: float) -> Stall | None:
        """Every loop pass: progress events, the stall rule, a heartbeat, fresh metrics."""
        with self._lock:
            p, steps, self._steps = self._progress, self._steps, []
        for step in steps:  # every step, in order, logged from the main loop
            self.log(EVENT_PROGRESS, "info", **step)
        if p is not None and p.stalled(now, self.cfg.health.load_stall):
            with self._lock:  # one verdict per stall (a line may have arrived meanwhile)
                if self._progress is not None:
                    self._progress = replace(self._progress, progress_at=now)
            self.log(EVENT_STALLED, "error", step=p.doing(),
                     stalled_s=round(p.stalled_for(now), 1),
                     load_stall_s=self.cfg.health.load_stall)
            self._last_code = "load_stall"
            return Stall(p.stall_cause(self.cfg.health.load_stall))
        self._record("heartbeat", phase=self._phase)
        self._publish(now)
        return None

    def set_gate(self, source: Callable[[], ex.GateReading] | None) -> None:
        """The gate's figures (issue 10), read at every scrape; None when the gate is off."""
        self.exposition.gate = source

    def loading_step(self) -> str | None:
        """The current load step without elapsed times (`shards 9/20 (45%)`): a change of it
        is news for STATUS and the state file."""
        with self._lock:
            p = self._progress
        return None if p is None else p.doing()

    def loading_status(self, now: float) -> str | None:
        """`loading: shards 9/20 (45%), 3m12s elapsed; last load took 8m40s`, while loading."""
        with self._lock:
            p = self._progress
        return None if p is None else p.status(now, self._c.last_load_s)

    # -- inside -----------------------------------------------------------------------------

    def _spawned(self, pid: object, now: float) -> None:
        self._c.vllm_starts += 1
        self._record("vllm.start", pid=pid)
        with self._lock:
            self._progress = LoadProgress.start(now, self._may_download())
            self._steps = []

    def _may_download(self) -> bool:
        v = self.cfg.vllm
        offline = (v.env_dict.get("HF_HUB_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")) == "1"
        return not offline and not os.path.isdir(v.model)

    def _gpu_sample(self, f: Mapping[str, Any]) -> None:
        gpus = []
        i = 0
        while f"gpu{i}_name" in f:
            p = f"gpu{i}_"
            used, total = f.get(p + "mem_used_gib"), f.get(p + "mem_total_gib")
            gpus.append(ex.GpuReading(
                i, str(f.get(p + "name", "")), _num(f.get(p + "temp_c")),
                None if used is None else int(float(used) * GIB),
                None if total is None else int(float(total) * GIB)))
            i += 1
        resident = f.get("vllm_resident_gib")
        self._c.gpus = tuple(gpus)
        self._c.resident = None if resident is None else int(float(resident) * GIB)
        temps = [g.temperature_c for g in gpus if g.temperature_c is not None]
        used_all = [g.memory_used_bytes for g in gpus if g.memory_used_bytes is not None]
        self._record("gpu.sample", temp_c=max(temps) if temps else None,
                     mem_used_bytes=sum(used_all) if used_all else None,
                     vllm_resident_bytes=self._c.resident)

    def _record(self, kind: str, **fields: Any) -> None:
        ok = self.history.record(kind, **fields)
        if not ok and self.history.errors and not self._history_errors_logged:
            self._history_errors_logged = True
            self.log(EVENT_WRITE_FAILED, "warning", path=str(self.history.path),
                     error=self.history.last_error)

    def snapshot(self, now: float | None = None) -> ex.Snapshot:
        c, wall = self._c, self.wall()
        with self._lock:
            p = self._progress
            probes, results = dict(c.probes), dict(c.results)
        return ex.Snapshot(
            phase=self._phase, ready_since=self._ready_since, vllm_starts=c.vllm_starts,
            restarts_by_cause=dict(c.restarts),
            restarts_in_window=sum(1 for t in self._window
                                   if wall - t < self.cfg.restart.window),
            max_restarts=self.cfg.restart.max_restarts, give_ups=c.give_ups,
            last_give_up_code=c.last_give_up[0] if c.last_give_up else None,
            last_give_up_at=c.last_give_up[1] if c.last_give_up else None,
            last_load_s=c.last_load_s, load_seconds=c.load,
            load_shards=p.shards if p is not None else None,
            loading_for_s=(now - p.started_at) if p is not None and now is not None else None,
            probe_seconds=probes, probe_results=results, gpus=c.gpus,
            vllm_gpu_resident_bytes=c.resident, xid_by_code=dict(c.xid),
            gpu_findings_by_code=dict(c.findings), gpu_fatal=c.gpu_fatal,
            log_lines_dropped=c.dropped, history_write_errors=self.history.errors,
            vllm_version=self.vllm_version)

    def _publish(self, now: float | None = None) -> None:
        self.exposition.update(self.snapshot(now))


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
