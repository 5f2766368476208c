"""The soak (issue 11 part 4): the daemon supervising the stand-in vLLM for a fixed time, with a
fault injected at random (seeded) intervals, checked against what the daemon recorded.

    .venv/bin/python bench/soak.py [--minutes 30] [--seed 11] [--faults N] [--kinds a,b]
                                   [--plot docs/soak-report.png] [--json OUT.json] [--keep]

The daemon is `python -m nika_supervisor run` from this tree, with its own state_dir and
runtime_dir under a temporary directory and `metrics_listen` on a free loopback port. The
stand-in (tests/standin/) "loads" for STANDIN_BIND_DELAY_S = 5 s at each start.

Fault kinds (FAULTS below), each with the restart cause code the daemon must record in its
history within a bound, or no restart at all:
- sigkill:    SIGKILL of the API server                          -> restart, code `killed_sigkill`
- hang:       SIGSTOP of the API server (never SIGCONT)          -> restart, code `health`
- exit0:      the server exits 0 on its own (control exit)       -> restart, code
              `exit_zero_unasked`
- frozen:     the engine freezes: /health and /v1/models stay 200, completions hang
                                                                 -> restart, code `canary`
- slow_long:  /health answers 3 s late (> health.timeout 2 s) for 30 s -> UNHEALTHY, then a
              restart, code `health` (30 s is far past failure_threshold x interval)
- slow_brief: /health answers 3 s late for 1.5 s, then on time again -> UNHEALTHY
              (health.failed) and back (health.recovered), and NO restart: fewer than
              failure_threshold probes can fail.

The soak's own checks (exit 1 if any fails):
- every fault detected: its matching history record (a `restart` with the right code, or for
  slow_brief a health.failed then health.recovered log event) within its bound;
- zero false restarts: every `restart` in the history is matched to exactly one injected fault;
- nika_ready in every /metrics scrape (every 15 s) agrees with the nika_phase state set of the
  same scrape (ready and unhealthy are ready), and with the phase in state.json read right after
  unless the history shows a phase change between the two reads;
- the daemon's RSS (VmRSS, every 30 s): the median of the last three samples is within
  RSS_GROWTH_KB of the median of the first three;
- availability: the report's (`nika-supervisor report --json`) and the served availability
  (a 1-token completion sent every 2 s on a fixed schedule, answered within 2 s) against
  the ideal,
  1 - (sum of injected downtime + load time) / duration, where the injected downtime of one
  fault is what the fault costs before any supervisor may act under the configured rules
  (docs/BENCHMARKS.md "Soak" defines it per kind; `ideal_downtime_s` below). The soak
  reports these; it asserts only that the report's availability is at most 1 and at least
  the ideal minus MAX_OVERHEAD per restart (backoff + stop + probe phase), a loose floor.

At the end it runs `nika-supervisor report --config CFG --since 1h` (text and --json) and,
with --plot, `--plot FILE` (a .png and a .svg next to it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standin"

LOAD_S = 5.0  # STANDIN_BIND_DELAY_S: the stand-in's "load"
HEALTH = {"interval": "1s", "timeout": "2s", "failure_threshold": 5, "startup_timeout": "60s",
          "canary_interval": "20s", "canary_timeout": "5s", "stall_after": "120s"}
INTERVAL, TIMEOUT, THRESHOLD, CANARY_EVERY, CANARY_TIMEOUT = 1.0, 2.0, 5, 20.0, 5.0
RESTART = {"backoff_initial": "1s", "backoff_max": "5s", "max_restarts": 1000, "window": "1h",
           "stop_timeout": "5s", "healthy_after": "60s"}
SLOW_DELAY_S = TIMEOUT + 1.0
SLOW_LONG_S = 30.0
SLOW_BRIEF_S = 1.5
HANG_BOUND = INTERVAL * THRESHOLD + TIMEOUT + 1.0  # README: interval x threshold + timeout
CANARY_BOUND = CANARY_EVERY + CANARY_TIMEOUT + 2.0
# kind -> (expected restart code or None, detection bound in seconds)
FAULTS: dict[str, tuple[str | None, float]] = {
    "sigkill": ("killed_sigkill", 2.0),
    "hang": ("health", HANG_BOUND),
    "exit0": ("exit_zero_unasked", 2.0),
    "frozen": ("canary", CANARY_BOUND),
    "slow_long": ("health", HANG_BOUND),
    "slow_brief": (None, SLOW_BRIEF_S + TIMEOUT + 3.0),
}
RSS_GROWTH_KB = 4096
MAX_OVERHEAD_S = 15.0
SCRAPE_EVERY, RSS_EVERY, SERVE_EVERY = 15.0, 30.0, 2.0
MARGIN_S = 10.0


def ideal_downtime_s(kind: str) -> float:
    """What one fault costs before any supervisor may act under the configured rules (the
    ideal supervisor then restarts at once, no backoff, and the load follows)."""
    if kind in ("sigkill", "exit0"):
        return 0.0  # the server is gone: an exit is seen at once
    if kind == "hang":
        # failure_threshold consecutive failed probes, one interval apart, the first failing
        # `timeout` after the fault: (threshold - 1) x interval + timeout
        return (THRESHOLD - 1) * INTERVAL + TIMEOUT
    if kind == "frozen":
        # only a canary can see it, and under traffic (the soak's client) it is sent
        # canary_interval after the last progress, then waits canary_timeout
        return CANARY_EVERY + CANARY_TIMEOUT
    if kind in ("slow_long", "slow_brief"):
        # only /health is slow: completions are answered on time, a client sees nothing (the
        # restart that slow_long earns costs a load, counted with the loads)
        return 0.0
    raise ValueError(kind)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Fault:
    kind: str
    t: float  # wall clock of the injection
    api_pid: int
    expected: str | None
    bound_s: float
    detected: bool = False
    detect_s: float | None = None
    matched: str = ""


@dataclass
class Soak:
    work: Path
    minutes: float
    seed: int
    faults_max: int | None
    kinds: list[str]
    gap: tuple[float, float]
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    scrapes: list[dict[str, Any]] = field(default_factory=list)
    served: list[tuple[float, bool]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.standin_dir = self.work / "standin"
        self.standin_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.work / "state"
        self.runtime_dir = self.work / "run"
        self.metrics_port = free_port()
        self.api_port = free_port()
        cfg = {
            "vllm": {"python": sys.executable, "entrypoint": "api_server",
                     "model": "standin-model", "served_model_name": ["nika"],
                     "port": self.api_port,
                     "env": {"PYTHONPATH": str(STANDIN),
                             "STANDIN_STATE_DIR": str(self.standin_dir),
                             "STANDIN_BIND_DELAY_S": str(LOAD_S),
                             "STANDIN_MAX_LIFETIME_S": str(int(self.minutes * 60 + 900))}},
            "health": HEALTH, "restart": RESTART, "gpu": {"nvml": "off"},
            "supervisor": {"log_format": "json", "runtime_dir": str(self.runtime_dir),
                           "state_dir": str(self.state_dir),
                           "metrics_listen": f"127.0.0.1:{self.metrics_port}"},
        }
        self.config = self.work / "soak.yaml"
        self.config.write_text(yaml.safe_dump(cfg))

    # -- the daemon ------------------------------------------------------------------------

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nika_supervisor", "run", "--config", str(self.config)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            start_new_session=True)
        self.t_start = time.time()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with open(self.work / "daemon.log", "wb") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if ev.get("event") == "vllm.output":
                    continue
                with self.lock:
                    self.events.append((time.time(), ev))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # a stand-in left behind (it should not be) is ours to end, by its recorded pid
        with contextlib.suppress(OSError):
            for line in (self.standin_dir / "starts.log").read_text().splitlines():
                pid = int(line.split()[1])
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                    if f"STANDIN_STATE_DIR={self.standin_dir}".encode() in env:
                        self.problems.append(f"stand-in pid {pid} outlived the daemon")
                        os.kill(pid, signal.SIGKILL)

    def phase(self) -> str | None:
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads((self.runtime_dir / "state.json").read_text()).get("phase"))
        return None

    def history(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in (self.state_dir / "history.jsonl").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def api_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.standin_dir / "api.pid").read_text().strip())
        return None

    def wait_ready(self, timeout: float, steady_s: float = 0.0) -> bool:
        """READY (phase ready) and steadily so for steady_s."""
        deadline = time.monotonic() + timeout
        since = None
        while time.monotonic() < deadline and not self.stop_flag.is_set():
            if self.phase() == "ready":
                since = since or time.monotonic()
                if time.monotonic() - since >= steady_s:
                    return True
            else:
                since = None
            time.sleep(0.2)
        return False

    def control(self, **body: Any) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/_standin/engine",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
        except OSError:
            if "exit" not in body:
                raise

    # -- samplers --------------------------------------------------------------------------

    def _every(self, seconds: float, fn: Any) -> None:
        def loop() -> None:
            while not self.stop_flag.is_set():
                try:
                    fn()
                except Exception as e:  # a sampler must not die silently
                    self.problems.append(f"{fn.__name__}: {type(e).__name__}: {e}")
                self.stop_flag.wait(seconds)
        threading.Thread(target=loop, daemon=True).start()

    def sample_rss(self) -> None:
        self.rss.append((time.time(), rss_kb(self.proc.pid)))

    def scrape(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families
        t0 = time.time()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            text = r.read().decode()
        t1 = time.time()
        state_phase = self.phase()
        t2 = time.time()
        ready, phases = None, []
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "nika_ready":
                    ready = s.value
                elif s.name == "nika_phase" and s.value == 1:
                    phases.append(s.labels.get("nika_phase") or s.labels.get("phase"))
        ok = len(phases) == 1 and ready == (1.0 if phases[0] in ("ready", "unhealthy") else 0.0)
        moved = any(t0 - 0.5 <= r["t"] <= t2 + 0.5 for r in self.history()
                    if r["kind"] == "phase")
        agrees = state_phase == (phases[0] if phases else None) or moved
        self.scrapes.append({"t": t0, "ready": ready, "phase": phases, "state_phase": state_phase,
                             "consistent": ok, "agrees_with_state": agrees,
                             "scrape_s": round(t1 - t0, 3)})

    def _serve_loop(self) -> None:
        """serve_probe on a fixed schedule, SERVE_EVERY apart whatever each one takes (a
        probe that times out must not stretch the cadence and so weigh less)."""
        nxt = time.monotonic()
        while not self.stop_flag.is_set():
            threading.Thread(target=self.serve_probe, daemon=True).start()
            nxt += SERVE_EVERY
            self.stop_flag.wait(max(0.0, nxt - time.monotonic()))

    def serve_probe(self) -> None:
        """A client: a 1-token completion through the alias, answered within 2 s or not."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/v1/completions",
            data=json.dumps({"model": "nika", "prompt": "hi", "max_tokens": 1}).encode(),
            headers={"content-type": "application/json"})
        t = time.time()
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                ok = r.status == 200 and bool(json.loads(r.read()).get("choices"))
        except (OSError, ValueError):
            ok = False
        with self.lock:
            self.served.append((t, ok))

    # -- faults ----------------------------------------------------------------------------

    def inject(self, kind: str) -> Fault:
        pid = self.api_pid()
        assert pid is not None
        code, bound = FAULTS[kind]
        f = Fault(kind, time.time(), pid, code, bound)
        if kind == "sigkill":
            os.kill(pid, signal.SIGKILL)
        elif kind == "hang":
            os.kill(pid, signal.SIGSTOP)
        elif kind == "exit0":
            self.control(exit=0)
        elif kind == "frozen":
            self.control(frozen=True)
        elif kind in ("slow_long", "slow_brief"):
            self.control(health_delay_s=SLOW_DELAY_S)
            hold = SLOW_LONG_S if kind == "slow_long" else SLOW_BRIEF_S
            time.sleep(hold)  # the slowdown's length is the fault itself
            with contextlib.suppress(OSError):  # slow_long: the server may be restarted by now
                if self.api_pid() == pid:
                    self.control(health_delay_s=0)
        self.faults.append(f)
        return f

    def schedule(self) -> list[str]:
        rng = random.Random(self.seed)
        cycle: list[str] = []
        while len(cycle) < 1000:
            batch = list(self.kinds)
            rng.shuffle(batch)
            cycle += batch
        self.rng = rng
        return cycle

    def run(self) -> None:
        duration = self.minutes * 60
        kinds = self.schedule()
        # no fault this close to the end: time to detect the slowest kind, restart and load
        margin = max(FAULTS[k][1] + (SLOW_LONG_S if k == "slow_long" else 0)
                     for k in self.kinds) + LOAD_S + MARGIN_S
        self.start()
        end = self.t_start + duration
        try:
            # /metrics answers from the daemon's start (before vLLM is up): scrape from then
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.metrics_port), 1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("/metrics never answered") from None
                    time.sleep(0.1)
            self._every(SCRAPE_EVERY, self.scrape)
            threading.Thread(target=self._serve_loop, daemon=True).start()
            if not self.wait_ready(60):
                raise RuntimeError("the daemon never became ready")
            self._every(RSS_EVERY, self.sample_rss)  # RSS from the first READY on
            i = 0
            while self.faults_max is None or i < self.faults_max:
                gap = self.rng.uniform(*self.gap)
                at = time.time() + gap
                if at + margin > end:  # leave time to detect and recover
                    break
                while time.time() < at:
                    time.sleep(0.5)
                # never inject into a restart in progress: ready and steady for 3 s first
                if not self.wait_ready(max(1.0, end - time.time() - margin),
                                       steady_s=3.0) or time.time() + margin > end:
                    break
                kind = kinds[i]
                f = self.inject(kind)
                print(f"{time.strftime('%H:%M:%S')} fault {i + 1}: {kind} (pid {f.api_pid})",
                      flush=True)
                i += 1
                # one fault at a time: a frozen engine stays "ready" until the canary fails,
                # so wait for its restart (or its bound) before the next one
                deadline = f.t + f.bound_s + 10
                while time.time() < deadline and not (f.expected and any(
                        r["kind"] == "restart" and r["t"] >= f.t for r in self.history())):
                    time.sleep(0.5)
            while time.time() < end:
                time.sleep(0.5)
        finally:
            self.t_end = time.time()
            self.stop_flag.set()
            self.sample_rss()
            time.sleep(0.5)
            self.stop()

    # -- checks ----------------------------------------------------------------------------

    def check(self) -> dict[str, Any]:
        hist = self.history()
        restarts = [r for r in hist if r["kind"] == "restart"]
        used: set[int] = set()
        for n, f in enumerate(self.faults):
            # a fault's window: from its injection to the next one (faults are serialized)
            until = min([f.t + f.bound_s + 5, *(g.t for g in self.faults[n + 1:n + 2])])
            if f.expected is None:  # slow_brief: health.failed then health.recovered
                failed = [t for t, e in self.events
                          if e.get("event") == "health.failed" and f.t <= t <= until]
                recovered = [t for t, e in self.events if e.get("event") == "health.recovered"
                             and failed and failed[0] <= t <= until]
                if failed and recovered:
                    f.detected, f.detect_s = True, round(failed[0] - f.t, 3)
                    f.matched = "health.failed+health.recovered"
                continue
            for i, r in enumerate(restarts):
                if i in used or not (f.t <= r["t"] <= until):
                    continue
                used.add(i)
                f.matched = r["code"]
                f.detect_s = round(r["t"] - f.t, 3)
                # slow_long: its detection counts from the injection (the slowdown's start)
                f.detected = r["code"] == f.expected and f.detect_s <= f.bound_s
                break
        false_restarts = [r for i, r in enumerate(restarts) if i not in used]
        if self.faults_max is not None and len(self.faults) < self.faults_max:
            self.problems.append(f"only {len(self.faults)} of {self.faults_max} faults injected")
        for f in self.faults:
            if not f.detected:
                self.problems.append(f"fault {f.kind} at {f.t:.1f} not detected as expected "
                                     f"({f.matched or 'no record'}, {f.detect_s} s, "
                                     f"bound {f.bound_s} s)")
            if f.expected is None and any(f.t <= r["t"] <= f.t + 30 for r in restarts):
                self.problems.append(f"a restart after {f.kind} at {f.t:.1f}")
        for r in false_restarts:
            self.problems.append(f"false restart: {r}")
        bad = [s for s in self.scrapes if not (s["consistent"] and s["agrees_with_state"])]
        for s in bad:
            self.problems.append(f"metrics inconsistent: {s}")
        if len(self.scrapes) < max(1, int((self.t_end - self.t_start) / SCRAPE_EVERY) - 2):
            self.problems.append(f"only {len(self.scrapes)} scrapes")
        rss = [kb for _, kb in self.rss if kb]
        rss_start = statistics.median(rss[:3]) if rss else 0
        rss_end = statistics.median(rss[-3:]) if rss else 0
        if rss_end - rss_start > RSS_GROWTH_KB:
            self.problems.append(f"RSS grew {rss_start} -> {rss_end} kB")
        # availability
        duration = self.t_end - self.t_start
        loads = [float(r["load_s"]) for r in hist if r["kind"] == "load"]
        injected = sum(ideal_downtime_s(f.kind) for f in self.faults)
        ideal = 1 - (injected + sum(loads)) / duration
        served_ok = [ok for t, ok in sorted(self.served)]
        served = sum(served_ok) / len(served_ok) if served_ok else None  # one every 2 s
        report = self.report_json()
        avail = report.get("availability")
        floor = ideal - MAX_OVERHEAD_S * len(restarts) / duration
        if avail is None or not (floor <= avail <= 1.0):
            self.problems.append(f"report availability {avail} outside [{floor:.4f}, 1]")
        by_kind: dict[str, list[Fault]] = {}
        for f in self.faults:
            by_kind.setdefault(f.kind, []).append(f)
        table = {k: {"count": len(fs), "detected": sum(f.detected for f in fs),
                     "detect_median_s": (round(statistics.median(d), 2) if (d := [
                         f.detect_s for f in fs if f.detect_s is not None]) else None),
                     "detect_max_s": round(max(d), 2) if d else None,
                     "bound_s": fs[0].bound_s, "code": fs[0].expected}
                 for k, fs in sorted(by_kind.items())}
        return {
            "duration_s": round(duration, 1), "seed": self.seed, "faults": table,
            "fault_list": [asdict(f) for f in self.faults],
            "restarts": len(restarts), "false_restarts": len(false_restarts),
            "loads": {"count": len(loads), "sum_s": round(sum(loads), 2),
                      "median_s": round(statistics.median(loads), 2) if loads else None},
            "injected_downtime_s": round(injected, 2), "ideal_availability": round(ideal, 5),
            "report_availability": avail,
            "served_availability": None if served is None else round(served, 5),
            "served_probes": len(served_ok), "served_failed": served_ok.count(False),
            "rss_kb": {"start": rss_start, "end": rss_end, "min": min(rss, default=0),
                       "max": max(rss, default=0), "samples": len(rss)},
            "scrapes": len(self.scrapes), "scrapes_bad": len(bad),
            "history_records": len(hist),
            "problems": self.problems, "ok": not self.problems,
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}",
        }

    def report_cmd(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nika_supervisor", "report", "--config", str(self.config),
             "--since", "1h", *extra], cwd=REPO, capture_output=True, text=True, timeout=120)

    def report_json(self) -> dict[str, Any]:
        p = self.report_cmd("--json")
        if p.returncode != 0:
            self.problems.append(f"report --json exited {p.returncode}: {p.stderr[-500:]}")
            return {}
        return dict(json.loads(p.stdout))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--faults", type=int, default=None, help="at most this many faults")
    ap.add_argument("--kinds", default=",".join(FAULTS), help="comma-separated fault kinds")
    ap.add_argument("--gap", default=None,
                    help="MIN,MAX seconds between faults (default 120,300; with --faults N, "
                         "spread N faults over the run)")
    ap.add_argument("--plot", default=None, help="also write the report's plot here (and .svg)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k]
    for k in kinds:
        if k not in FAULTS:
            ap.error(f"unknown fault kind {k!r} (known: {', '.join(FAULTS)})")
    if a.gap:
        lo, hi = (float(x) for x in a.gap.split(","))
    elif a.faults:  # quick mode: one fault after another (each waits for READY anyway)
        lo, hi = 2.0, 5.0
    else:
        lo, hi = 120.0, 300.0
    tmp = tempfile.mkdtemp(prefix="nika-soak-") if a.work is None else a.work
    work = Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(work, a.minutes, a.seed, a.faults, kinds, (lo, hi))
    print(f"soak: {a.minutes} min, seed {a.seed}, kinds {kinds}, gap {lo:.0f}-{hi:.0f} s, "
          f"work {work}, metrics 127.0.0.1:{soak.metrics_port}", flush=True)
    soak.run()
    result = soak.check()
    text = soak.report_cmd()
    result["report_text"] = text.stdout
    if a.plot:
        for path in (a.plot, str(Path(a.plot).with_suffix(".svg"))):
            p = soak.report_cmd("--plot", path)
            if p.returncode != 0:
                soak.problems.append(f"report --plot {path} exited {p.returncode}: "
                                     f"{p.stderr[-300:]}")
        result["ok"] = not soak.problems
    result["config"] = yaml.safe_load(soak.config.read_text())
    out = json.dumps(result, indent=2, default=str)
    if a.json:
        Path(a.json).write_text(out + "\n")
    print(out)
    print(text.stdout)
    if a.work is None and not a.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
