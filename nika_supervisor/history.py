"""The daemon's history: one JSON line per thing that happened, in its StateDirectory, kept
across daemon restarts and reboots. `nika-supervisor report` reads it, and a starting daemon
reads its restart budget and backoff back from it (`boot_budget`), so that a crash loop slows
down across daemon restarts instead of starting over with a fresh budget.

File: `history.jsonl` in `supervisor.state_dir`, else `$STATE_DIRECTORY` (systemd's
`StateDirectory=nika-vllm`), else `/var/lib/nika-vllm` as root, else
`$XDG_STATE_HOME/nika-vllm` (`~/.local/state/nika-vllm`). When the file would pass `max_bytes`
it becomes `history.jsonl.1` (replacing the previous one) and a new file starts: at most twice
`max_bytes` on disk. At the default 4 MiB a file holds weeks: phase changes are rare and GPU
samples and heartbeats are throttled (`THROTTLE_S`).

Each line: `{"t": <unix seconds>, "kind": KIND, ...fields}`. Wall-clock time, because it must
mean something after a reboot; `boot_budget` turns it into ages. Lines are appended and
flushed (no fsync: a power cut may lose the last lines; a torn last line is skipped on read).
A write that fails (disk full, read-only) is counted in `errors` and never raises: the history
must not take the daemon down.

Kinds (the lead's executor records them; `report` and `boot_budget` read them):

| kind | fields | when |
| --- | --- | --- |
| `daemon.start` | pid, version | the daemon starts |
| `daemon.exit` | code, reason | the daemon exits (any code) |
| `phase` | from, to, reason | every phase change |
| `vllm.start` | pid | vLLM spawned |
| `load` | load_s, breakdown fields | vLLM became ready |
| `restart` | cause, code, delay_s, attempt | a restart is decided |
| `backoff_reset` | healthy_s | ready long enough: the backoff starts over |
| `give_up` | reason, code, cause_code | the daemon gives up (exit 69/79/80) |
| `gpu.finding` | code, cls, detail | a GPU finding (warn, restart or fatal class) |
| `gpu.sample` | temp_c, mem_used_bytes, mem_total_bytes, vllm_resident_bytes | throttled |
| `heartbeat` | phase | throttled; bounds the unknown when the daemon dies unrecorded |
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nika_supervisor.budget import backoff_delay  # the policy's own formula, not a copy
from nika_supervisor.config import RestartConfig
from nika_supervisor.durations import format_duration

HISTORY_FILE = "history.jsonl"
MAX_BYTES = 4 * 1024 * 1024
THROTTLE_S = {"gpu.sample": 60.0, "heartbeat": 300.0}

Record = dict[str, Any]

# Event names (README "Logs").
EVENT_BUDGET = "restart.budget_carried"  # info/warning at boot: restarts, attempt, delay_s
EVENT_WRITE_FAILED = "history.write_failed"  # warning, once per daemon: path, error


def default_state_dir(configured: str | None = None,
                      environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if configured:
        return configured
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/nika-vllm"
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "/tmp"), ".local",
                                                     "state")
    return os.path.join(base, "nika-vllm")


class History:
    """The writer. Thread-safe: the GPU monitor's thread records findings too."""

    def __init__(self, state_dir: str, max_bytes: int = MAX_BYTES,
                 wall: Callable[[], float] = time.time,
                 throttle: Mapping[str, float] | None = None) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / HISTORY_FILE
        self.max_bytes = max_bytes
        self.wall = wall
        self.throttle = dict(THROTTLE_S if throttle is None else throttle)
        self.errors = 0
        self.last_error = ""
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, kind: str, **fields: Any) -> bool:
        """Append one record; False if it was throttled or could not be written."""
        now = self.wall()
        with self._lock:
            every = self.throttle.get(kind)
            if every is not None and now - self._last.get(kind, float("-inf")) < every:
                return False
            line = json.dumps({"t": round(now, 3), "kind": kind, **fields},
                              separators=(",", ":"), default=str) + "\n"
            data = line.encode()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    if self.path.stat().st_size + len(data) > self.max_bytes:
                        os.replace(self.path, self.path.with_name(HISTORY_FILE + ".1"))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as e:
                self.errors += 1
                self.last_error = f"{self.path}: {e.strerror or e}"
                return False
            if every is not None:
                self._last[kind] = now
            return True

    def read(self) -> list[Record]:
        return read_history(str(self.dir))


def read_history(state_dir: str) -> list[Record]:
    """Every readable record, oldest first (the rotated file, then the current one). Lines
    that are not JSON objects with a numeric `t` and a `kind` (a torn last line) are skipped."""
    out: list[Record] = []
    for name in (HISTORY_FILE + ".1", HISTORY_FILE):
        try:
            text = (Path(state_dir) / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if (isinstance(rec, dict) and isinstance(rec.get("t"), int | float)
                    and isinstance(rec.get("kind"), str)):
                out.append(rec)
    out.sort(key=lambda r: r["t"])  # stable: equal times keep file order
    return out


# ------------------------------------------------------------------------ the restart budget


def launch_fingerprint(vllm: object) -> str:
    """A stable id of what runs (the `vllm:` section; the key file by name only): the same
    across processes, unlike hash()."""
    return hashlib.sha256(repr(vllm).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class BootBudget:
    """What a starting daemon carries over from the history.

    restart_ages: how long ago each restart within `restart.window` was decided, oldest
    first (the policy's restart_log, as ages). attempt: the backoff exponent. delay_s: how long
    to wait before the first start (the backoff still owed after the last failure).
    """

    restart_ages: tuple[float, ...] = ()
    attempt: int = 0
    delay_s: float = 0.0
    last_cause: str = ""

    def restart_log(self, now: float) -> tuple[float, ...]:
        """The restart times on the caller's (monotonic) clock."""
        return tuple(now - age for age in self.restart_ages)

    @property
    def carried(self) -> bool:
        return bool(self.restart_ages or self.attempt or self.delay_s)

    def describe(self) -> str:
        """For the log and STATUS: `5 restarts in the window carried over, backoff 4s ...`."""
        if not self.carried:
            return "fresh restart budget"
        text = f"{len(self.restart_ages)} restart(s) in the window carried over from history"
        if self.delay_s > 0:
            text += f"; first start in {format_duration(self.delay_s)}"
        if self.last_cause:
            text += f" (last failure: {self.last_cause})"
        return text


# give-ups that systemd restarts (exit 69): the next daemon's start is one more restart.
_BUDGET_GIVE_UP = 69


def boot_budget(records: Iterable[Record], now_wall: float, cfg: RestartConfig,
                jitter: float = 0.5, launch: str | None = None) -> BootBudget:
    """The restart budget and backoff a starting daemon inherits.

    - Every `restart` record, and every give-up for a spent budget (code 69, which systemd
      restarts), is a restart at its time; those within `restart.window` are carried.
    - The backoff exponent counts those restarts since the last healthy stretch: a
      `backoff_reset` record, or ready for `restart.healthy_after` (seen from a phase change
      or heartbeat while ready) starts it over.
    - A stop on request (`daemon.exit` code 0) ends a crash loop: nothing is carried past it.
    - So does a new launch configuration: with `launch` given (`launch_fingerprint`), a
      history whose last `daemon.start` ran another `vllm:` section carries nothing (the
      operator changed what runs; the old crash loop says nothing about it).
    - The first start waits the backoff owed for the carried exponent, minus the time that
      has passed since the last failure (systemd's RestartSec counts as waiting).

    Under the shipped unit (RestartSec=15s) with backoff 1s..4s and max_restarts 5, a server
    that always fails gets 6 starts from the first daemon, then one per later daemon (its
    budget is spent, so its first failure gives up), at least 15 s apart: at most 10 starts in
    any 60 s (tests/unit/test_history.py simulates it).
    """
    restarts: list[float] = []
    attempt = 0
    last_failure_t: float | None = None
    last_cause = ""
    ready_since: float | None = None

    def healthy_check(t: float) -> None:
        nonlocal attempt
        if ready_since is not None and t - ready_since >= cfg.healthy_after:
            attempt = 0

    records = list(records)
    if launch is not None:
        starts = [r for r in records if r["kind"] == "daemon.start"]
        if starts and starts[-1].get("launch") not in (None, launch):
            return BootBudget()
    for r in records:
        t, kind = float(r["t"]), r["kind"]
        if t > now_wall:
            t = now_wall  # a clock that went back: treat the future as now
        healthy_check(t)
        if kind == "restart" or (kind == "give_up" and r.get("code") == _BUDGET_GIVE_UP):
            restarts.append(t)
            attempt += 1
            ready_since = None
            last_failure_t = t
            code = r.get("cause_code") if kind == "give_up" else r.get("code")
            last_cause = str(code or r.get("cause") or r.get("reason") or "")
        elif kind == "backoff_reset":
            attempt = 0
        elif kind == "phase":
            ready_since = t if r.get("to") == "ready" else (
                ready_since if r.get("to") == "unhealthy" else None)
        elif kind == "daemon.start":
            ready_since = None
        elif kind == "daemon.exit" and r.get("code") == 0:
            restarts, attempt, last_failure_t, last_cause, ready_since = [], 0, None, "", None
    healthy_check(now_wall)

    ages = tuple(now_wall - t for t in restarts if now_wall - t < cfg.window)
    delay = 0.0
    if attempt and last_failure_t is not None:
        # the boot start is the restart that followed the last failure: its delay was
        # backoff(attempt - 1), as in the policy, where attempt then counts it
        owed = backoff_delay(cfg, attempt - 1, jitter)
        delay = max(0.0, owed - (now_wall - last_failure_t))
    return BootBudget(restart_ages=ages, attempt=attempt, delay_s=round(delay, 3),
                      last_cause=last_cause)
