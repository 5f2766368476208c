"""The history file (rotation, read-back across daemon restarts, failures that must not raise)
and the restart budget a starting daemon reads back from it, with an injected clock."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nika_supervisor import policy
from nika_supervisor.config import RestartConfig
from nika_supervisor.history import (
    HISTORY_FILE,
    BootBudget,
    History,
    backoff_delay,
    boot_budget,
    default_state_dir,
    read_history,
)

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "nika-vllm.service"
T0 = 1_800_000_000.0  # a wall-clock time in 2027


class Wall:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_records_survive_a_new_writer(tmp_path: Path) -> None:
    """What one daemon wrote, the next one (a new History on the same dir) reads back, in
    order, with its fields."""
    wall = Wall()
    h = History(str(tmp_path), wall=wall)
    assert h.record("daemon.start", pid=10, version="0.1.0")
    wall.t += 5
    assert h.record("restart", cause="vLLM exited with status 1", code="exit", delay_s=1.0,
                    attempt=1)
    again = History(str(tmp_path), wall=wall).read()
    assert [(r["kind"], r["t"]) for r in again] == [("daemon.start", T0),
                                                     ("restart", T0 + 5)]
    assert again[1]["code"] == "exit" and again[1]["attempt"] == 1


def test_rotation_bounds_the_size_and_keeps_the_newest(tmp_path: Path) -> None:
    """Past max_bytes the file becomes history.jsonl.1 (the older .1 is dropped): never more
    than twice max_bytes on disk, and the newest records are always readable."""
    wall = Wall()
    h = History(str(tmp_path), max_bytes=2000, wall=wall)
    for i in range(500):
        wall.t += 1
        h.record("phase", **{"from": "ready", "to": "unhealthy", "reason": f"probe {i}"})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [HISTORY_FILE, HISTORY_FILE + ".1"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    back = read_history(str(tmp_path))
    reasons = [r["reason"] for r in back]
    assert reasons[-1] == "probe 499"
    n = len(reasons)
    assert 10 < n < 500 and reasons == [f"probe {i}" for i in range(500 - n, 500)]


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    """A power cut can leave half a line; a stray line is not a record."""
    (tmp_path / HISTORY_FILE).write_text(
        json.dumps({"t": T0, "kind": "daemon.start"}) + "\n" + "[1, 2]\n"
        + json.dumps({"kind": "no time"}) + "\n" + '{"t": 18000000')
    assert [r["kind"] for r in read_history(str(tmp_path))] == ["daemon.start"]
    assert read_history(str(tmp_path / "missing")) == []


def test_a_write_that_fails_is_counted_not_raised(tmp_path: Path) -> None:
    """Disk full or a read-only dir must never take the daemon down."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    h = History(str(blocker / "state"))
    assert h.record("daemon.start") is False
    assert h.errors == 1 and "not-a-dir" in h.last_error


def test_samples_and_heartbeats_are_throttled(tmp_path: Path) -> None:
    """gpu.sample at most once a minute, heartbeat every 5 minutes; other kinds always."""
    wall = Wall()
    h = History(str(tmp_path), wall=wall)
    assert h.record("gpu.sample", temp_c=50)
    wall.t += 59
    assert not h.record("gpu.sample", temp_c=51)
    assert h.record("phase", to="ready")
    wall.t += 1
    assert h.record("gpu.sample", temp_c=52)
    assert [r.get("temp_c") for r in h.read() if r["kind"] == "gpu.sample"] == [50, 52]


def test_state_dir_resolution() -> None:
    """The key, else systemd's STATE_DIRECTORY, else /var/lib/nika-vllm as root."""
    assert default_state_dir("/srv/x", {"STATE_DIRECTORY": "/var/lib/nika-vllm"}) == "/srv/x"
    assert default_state_dir(None, {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == "/var/lib/a"
    import os
    expected = "/var/lib/nika-vllm" if os.geteuid() == 0 else "/h/.local/state/nika-vllm"
    assert default_state_dir(None, {"HOME": "/h"}) == expected


# ------------------------------------------------------------------------------ the budget

CFG = RestartConfig(backoff_initial=1.0, backoff_max=4.0, max_restarts=5, window=1800.0,
                    healthy_after=600.0)


def rec(dt: float, kind: str, **f: object) -> dict[str, object]:
    return {"t": T0 + dt, "kind": kind, **f}


def test_backoff_matches_the_policy() -> None:
    """history.backoff_delay is the policy's formula (the boot delay must agree with it)."""
    for attempt in range(8):
        for j in (0.0, 0.5, 0.99):
            assert backoff_delay(CFG, attempt, j) == policy.backoff_delay(CFG, attempt, j)


def test_fresh_history_gives_a_fresh_budget() -> None:
    assert boot_budget([], T0, CFG) == BootBudget()
    assert boot_budget([rec(0, "daemon.start")], T0 + 1, CFG).describe() == (
        "fresh restart budget")


def test_restarts_and_a_budget_give_up_are_carried_with_the_owed_backoff() -> None:
    """5 restarts and the give-up (69) that followed are 6 restarts in the window; the boot
    start still owes backoff(5) = 4 s, minus the 1.5 s already passed."""
    recs = [rec(0, "daemon.start")]
    t = 0.0
    for i in range(5):
        t += 1
        recs.append(rec(t, "restart", cause="exit 1", code="exit", attempt=i + 1))
    recs.append(rec(t + 1, "give_up", code=69, cause_code="exit", reason="6 failures"))
    recs.append(rec(t + 1.2, "daemon.exit", code=69))
    b = boot_budget(recs, T0 + t + 2.5, CFG, jitter=0.0)
    assert len(b.restart_ages) == 6 and b.attempt == 6
    assert b.delay_s == pytest.approx(4.0 - 1.5)
    assert b.last_cause == "exit"
    assert b.restart_log(100.0)[-1] == pytest.approx(100.0 - 1.5)
    assert "6 restart(s) in the window carried over" in b.describe()


def test_old_restarts_leave_the_window_and_the_delay_is_served() -> None:
    """Restarts older than restart.window are not carried; a backoff already waited out (the
    daemon was down longer than it) costs nothing at boot."""
    recs = [rec(0, "restart", code="exit"), rec(1000, "restart", code="health")]
    b = boot_budget(recs, T0 + 1000 + CFG.window - 10, CFG)
    assert len(b.restart_ages) == 1 and b.attempt == 2 and b.delay_s == 0.0


def test_a_healthy_stretch_resets_the_exponent_not_the_window() -> None:
    """Ready for healthy_after (seen by a heartbeat or the next phase change) starts the
    backoff over, as the policy does; the restarts stay in the window's count."""
    recs = [rec(0, "restart", code="exit"), rec(1, "restart", code="exit"),
            rec(5, "phase", to="ready"), rec(5 + 600, "heartbeat", phase="ready"),
            rec(700, "restart", code="xid.13")]
    b = boot_budget(recs, T0 + 701, CFG)
    assert b.attempt == 1 and len(b.restart_ages) == 3
    short = [rec(0, "restart"), rec(5, "phase", to="ready"), rec(60, "phase", to="stopping"),
             rec(61, "restart")]
    assert boot_budget(short, T0 + 62, CFG).attempt == 2
    explicit = [rec(0, "restart"), rec(1, "backoff_reset", healthy_s=600)]
    assert boot_budget(explicit, T0 + 2, CFG).attempt == 0


def test_a_stop_on_request_ends_the_crash_loop() -> None:
    """An operator's stop (exit 0) is not part of a crash loop: nothing carries past it."""
    recs = [rec(0, "restart"), rec(1, "restart"), rec(2, "daemon.exit", code=0)]
    assert boot_budget(recs, T0 + 3, CFG) == BootBudget()


def test_a_new_launch_config_starts_afresh() -> None:
    """The operator changed the vllm: section after a give-up: the old loop is not carried;
    the same section (or an old history without fingerprints) carries it."""
    from nika_supervisor.config import VllmConfig
    from nika_supervisor.history import launch_fingerprint

    a, b = launch_fingerprint(VllmConfig(model="/m")), launch_fingerprint(VllmConfig(model="/n"))
    assert a == launch_fingerprint(VllmConfig(model="/m")) and a != b
    recs = [rec(0, "daemon.start", launch=a), rec(1, "restart"), rec(2, "restart"),
            rec(3, "give_up", code=69), rec(4, "daemon.exit", code=69)]
    assert boot_budget(recs, T0 + 5, CFG, launch=b) == BootBudget()
    assert len(boot_budget(recs, T0 + 5, CFG, launch=a).restart_ages) == 3
    assert len(boot_budget([r for r in recs if r["kind"] != "daemon.start"], T0 + 5, CFG,
                           launch=b).restart_ages) == 3


def test_a_clock_that_went_back_is_not_a_future() -> None:
    """Records stamped after `now` (the wall clock was set back) count as just now."""
    b = boot_budget([rec(100, "restart", code="exit")], T0 + 50, CFG, jitter=0.0)
    assert b.restart_ages == (0.0,) and b.delay_s == 1.0


# --------------------------------------------- the crash loop across daemon restarts (issue 11)


def unit_setting(name: str) -> float:
    m = re.search(rf"^{name}=(\d+)(min|s)?\s*$", UNIT.read_text(), re.M)
    assert m, f"{name}= not in {UNIT}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def simulate(tmp: Path, carry: bool, start_limit: bool, horizon: float = 900.0,
             fail_after: float = 0.5, stop_s: float = 0.2) -> list[float]:
    """vLLM start times of a server that always fails `fail_after` s after it starts.

    Daemon lives follow the policy's rule (a failure with max_restarts restarts already in the
    window gives up with exit 69, else restart after backoff(attempt), attempt += 1); systemd
    restarts exit 69 after the unit's RestartSec= and refuses starts beyond StartLimitBurst=
    per StartLimitIntervalSec=. With `carry`, each daemon starts from boot_budget(history).
    """
    restart_sec = unit_setting("RestartSec")
    burst, interval = unit_setting("StartLimitBurst"), unit_setting("StartLimitIntervalSec")
    wall = Wall()
    h = History(str(tmp), wall=wall)
    starts: list[float] = []
    daemon_starts: list[float] = []
    while wall.t - T0 < horizon:
        if start_limit and sum(1 for d in daemon_starts if wall.t - d < interval) >= burst:
            break  # "Start request repeated too quickly"
        daemon_starts.append(wall.t)
        h.record("daemon.start", pid=1)
        b = boot_budget(h.read(), wall.t, CFG) if carry else BootBudget()
        log, attempt = list(b.restart_log(wall.t)), b.attempt
        wall.t += b.delay_s
        while True:
            starts.append(wall.t - T0)
            h.record("vllm.start", pid=2)
            wall.t += fail_after
            recent = [x for x in log if wall.t - x < CFG.window]
            if len(recent) >= CFG.max_restarts:
                h.record("give_up", code=69, cause_code="exit", reason="budget spent")
                wall.t += stop_s
                h.record("daemon.exit", code=69)
                break
            delay = backoff_delay(CFG, attempt, 0.5)
            log, attempt = [*recent, wall.t], attempt + 1
            h.record("restart", code="exit", cause="exit 1", delay_s=delay, attempt=attempt)
            wall.t += stop_s + delay
        wall.t += restart_sec
    return starts


def most_in_any(starts: list[float], span: float) -> int:
    return max(sum(1 for s in starts if a <= s < a + span) for a in starts)


def test_crash_loop_slows_down_across_daemon_restarts(tmp_path: Path) -> None:
    """backoff 1s..4s, max_restarts 5, under the shipped unit: with the budget carried over,
    at most 10 vLLM starts in any 60 s (with or without systemd's start limit); without it
    (every daemon starts over, as before this change) more than 10."""
    carried = simulate(tmp_path / "a", carry=True, start_limit=True)
    assert most_in_any(carried, 60.0) <= 10, carried
    unlimited = simulate(tmp_path / "b", carry=True, start_limit=False)
    assert most_in_any(unlimited, 60.0) <= 10, unlimited
    assert len(unlimited) > 20, "the loop goes on (slowly) without the start limit"
    fresh = simulate(tmp_path / "c", carry=False, start_limit=True)
    assert most_in_any(fresh, 60.0) > 10, fresh
