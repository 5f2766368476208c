"""Benchmarks of the supervisor itself against the stand-in vLLM server (tests/standin/).

Measures what issue 2 sets targets for, each in the same run, and prints a Markdown block
for docs/BENCHMARKS.md:
- crash detection: SIGKILL of the server -> the daemon's `vllm.exited` line (p50 <= 50 ms);
- ready lag: the stand-in starts listing the alias -> READY=1 on the notify socket (<= 0.5 s);
- hang detection: SIGSTOP of the server -> the restart decision
  (<= interval x threshold + timeout + 1 s);
- footprint: RSS and CPU of the daemon at steady state with interval 1 s (<= 40 MB, <= 0.5 %);
- log forwarding: lines/s from the child through the daemon, with loss counted (>= 50k/s).

Usage: .venv/bin/python bench/supervisor_bench.py [--crashes 20] [--footprint-s 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    """The daemon as a subprocess: JSON log lines and notify datagrams, each time-stamped on
    arrival with CLOCK_MONOTONIC (system-wide, so comparable with the stand-in's stamps)."""

    def __init__(self, work: Path, health: dict[str, Any], restart: dict[str, Any],
                 env: dict[str, str], capture_output_lines: bool = True) -> None:
        self.work = work
        self.state_dir = work / "standin"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "vllm": {"python": sys.executable, "entrypoint": "api_server",
                     "model": "standin-model", "served_model_name": ["nika"],
                     "port": free_port(),
                     "env": {"PYTHONPATH": str(STANDIN),
                             "STANDIN_STATE_DIR": str(self.state_dir), **env}},
            "health": health, "restart": restart, "gpu": {"nvml": "off"},
            "supervisor": {"log_format": "json", "runtime_dir": str(work / "run"),
                           "state_dir": str(work / "state")},
        }
        self.config = work / "bench.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.sock_path = str(work / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.notes: list[tuple[float, str]] = []
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.output_lines = 0
        self.capture_output_lines = capture_output_lines
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nika_supervisor", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE, env={**os.environ, "NOTIFY_SOCKET": self.sock_path},
            start_new_session=True)
        threading.Thread(target=self._read_notify, daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_notify(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.lock:
                self.notes.append((time.monotonic(), data.decode()))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t = time.monotonic()
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            with self.lock:
                if ev.get("event") == "vllm.output":
                    self.output_lines += 1
                    if not self.capture_output_lines:
                        continue
                self.events.append((t, ev))

    def wait_event(self, name: str, after: float = 0.0, timeout: float = 30.0,
                   **match: Any) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, ev in self.events:
                    if t >= after and ev.get("event") == name and all(
                            ev.get(k) == v for k, v in match.items()):
                        return t, ev
            time.sleep(0.002)
        raise TimeoutError(f"no {name} {match} within {timeout}s")

    def wait_note(self, text: str, after: float = 0.0, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, note in self.notes:
                    if t >= after and text in note.splitlines():
                        return t
            time.sleep(0.002)
        raise TimeoutError(f"no notify {text} within {timeout}s")

    def standin_file(self, name: str) -> str | None:
        try:
            return (self.state_dir / name).read_text().strip()
        except OSError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.sock.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


FAST_RESTART = {"backoff_initial": "50ms", "backoff_max": "100ms", "max_restarts": 1000,
                "window": "1h", "stop_timeout": "5s"}


def bench_crash_and_ready(work: Path, crashes: int, list_delay: float) -> dict[str, Any]:
    """list_delay 0 is real vLLM: its API server starts (and prints uvicorn's "Application
    startup complete") only after the engine has loaded the model, so the alias is listed
    from the first request. A delay > 0 models a server that answers before it lists the
    alias, which only the 0.25 s readiness poll catches."""
    d = Daemon(work / "crash", {"interval": "1s", "timeout": "2s", "failure_threshold": 3,
                                "startup_timeout": "30s"}, FAST_RESTART,
               {"STANDIN_LIST_DELAY_S": str(list_delay),
                # a random bind time, so the readiness poll's phase is not always the same
                "STANDIN_BIND_JITTER_S": "0.5"})
    detect: list[float] = []
    ready_lag: list[float] = []
    try:
        d.wait_event("vllm.ready")
        for _ in range(crashes):
            spawned_t, spawned = max(((t, e) for t, e in d.events
                                      if e.get("event") == "vllm.spawned"), key=lambda x: x[0])
            ready_note = d.wait_note("READY=1", after=spawned_t)
            listed = d.standin_file("listed_at")
            if listed:
                ready_lag.append(ready_note - float(listed))
            pid = spawned["pid"]
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            t1, _ = d.wait_event("vllm.exited", after=t0, pid=pid)
            detect.append(t1 - t0)
            d.wait_event("vllm.ready", after=t1)
    finally:
        d.stop()
    return {"crash_detect_ms": [round(x * 1000, 2) for x in detect],
            "ready_lag_ms": [round(x * 1000, 2) for x in ready_lag]}


def bench_hang(work: Path, runs: int) -> dict[str, Any]:
    health = {"interval": "1s", "timeout": "2s", "failure_threshold": 3, "startup_timeout": "30s"}
    d = Daemon(work / "hang", health, FAST_RESTART, {})
    out: list[float] = []
    try:
        d.wait_event("vllm.ready")
        for _ in range(runs):
            spawned_t, spawned = max(((t, e) for t, e in d.events
                                      if e.get("event") == "vllm.spawned"), key=lambda x: x[0])
            d.wait_event("vllm.ready", after=spawned_t)
            t0 = time.monotonic()
            os.kill(spawned["pid"], signal.SIGSTOP)
            t1, _ = d.wait_event("restart.scheduled", after=t0, timeout=30)
            out.append(t1 - t0)
            d.wait_event("vllm.ready", after=t1, timeout=30)
    finally:
        d.stop()
    return {"hang_detect_s": [round(x, 3) for x in out], "bound_s": 1 * 3 + 2 + 1}


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_footprint(work: Path, seconds: float, deep: bool) -> dict[str, Any]:
    """interval 1 s; deep=True adds a /metrics read per interval (the stall rule and the canary
    schedule at their defaults), deep=False is /health + /v1/models only."""
    deep_cfg = ({"stall_after": "120s", "canary_interval": "5m"} if deep
                else {"stall_after": 0, "canary_interval": 0})
    d = Daemon(work / f"footprint-{deep}", {"interval": "1s", "timeout": "2s",
                                            "failure_threshold": 3, "startup_timeout": "30s",
                                            **deep_cfg}, FAST_RESTART, {})
    hz = os.sysconf("SC_CLK_TCK")
    try:
        d.wait_event("vllm.ready")
        time.sleep(2)  # let start-up work (imports, first probes) settle out of the window
        pid = d.proc.pid
        c0, t0 = cpu_ticks(pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(rss_kb(pid))
            time.sleep(1)
        c1, t1 = cpu_ticks(pid), time.monotonic()
    finally:
        d.stop()
    return {"seconds": round(t1 - t0, 1), "cpu_percent": round(100 * (c1 - c0) / hz / (t1 - t0), 3),
            "rss_mb_median": round(statistics.median(rss) / 1024, 1),
            "rss_mb_max": round(max(rss) / 1024, 1)}


def bench_logs(work: Path, lines: int) -> dict[str, Any]:
    d = Daemon(work / "logs", {"interval": "1s", "timeout": "2s", "failure_threshold": 3,
                               "startup_timeout": "60s"}, FAST_RESTART,
               {"STANDIN_LOG_LINES": str(lines), "STANDIN_BIND_DELAY_S": "0"},
               capture_output_lines=False)
    try:
        t_spawn, _ = d.wait_event("vllm.spawned")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with d.lock:
                got = d.output_lines
            if got >= lines:
                break
            time.sleep(0.01)
        t_done = time.monotonic()
        time.sleep(0.5)
        with d.lock:
            got = d.output_lines
    finally:
        d.stop()
    return {"lines": lines, "received": got, "seconds": round(t_done - t_spawn, 3),
            "lines_per_s": round(lines / (t_done - t_spawn))}


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in
                  Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
                 platform.processor())
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crashes", type=int, default=20)
    ap.add_argument("--list-delay", type=float, default=0.0,
                    help="seconds the stand-in answers before it lists the alias (0: as vLLM)")
    ap.add_argument("--hangs", type=int, default=3)
    ap.add_argument("--footprint-s", type=float, default=300)
    ap.add_argument("--log-lines", type=int, default=200_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nika-bench-") as tmp:
        work = Path(tmp)
        res: dict[str, Any] = {"machine": machine()}
        res["crash"] = bench_crash_and_ready(work, args.crashes, args.list_delay)
        res["hang"] = bench_hang(work, args.hangs)
        res["logs"] = bench_logs(work, args.log_lines)
        res["footprint"] = bench_footprint(work, args.footprint_s, deep=False)
        res["footprint_deep"] = bench_footprint(work, args.footprint_s, deep=True)
    c, h = res["crash"], res["hang"]
    print(json.dumps(res, indent=2))
    print()
    print(f"machine: {res['machine']}")
    print(f"crash detection: p50 {statistics.median(c['crash_detect_ms']):.1f} ms, "
          f"p90 {pct(c['crash_detect_ms'], 0.9):.1f} ms, max {max(c['crash_detect_ms']):.1f} ms "
          f"(n={len(c['crash_detect_ms'])})")
    if c["ready_lag_ms"]:
        print(f"ready lag: p50 {statistics.median(c['ready_lag_ms']):.1f} ms, "
              f"max {max(c['ready_lag_ms']):.1f} ms (n={len(c['ready_lag_ms'])})")
    print(f"hang detection: median {statistics.median(h['hang_detect_s']):.2f} s, "
          f"max {max(h['hang_detect_s']):.2f} s, bound {h['bound_s']} s")
    lg = res["logs"]
    print(f"log forwarding: {lg['lines_per_s']} lines/s, {lg['received']}/{lg['lines']} received")
    for key, what in (("footprint", "probes only"), ("footprint_deep", "probes + /metrics")):
        fp = res[key]
        print(f"footprint ({what}) over {fp['seconds']} s: CPU {fp['cpu_percent']} % of one "
              f"core, RSS median {fp['rss_mb_median']} MB, max {fp['rss_mb_max']} MB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
