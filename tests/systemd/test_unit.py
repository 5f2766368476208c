"""The shipped nika-vllm.service under a real systemd 252, driving the stand-in vLLM server.

Everything is observed through systemctl and journalctl (and the stand-in's own state files,
for the server's side of the story). Timings that the issue asks to report are collected in
MEASUREMENTS and printed in the terminal summary ("systemd tier measurements").
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import poll_for
from nika_helpers import (
    CONFIG,
    RESTART_S,
    START_LIMIT_BURST,
    TIMEOUT_STOP_S,
    UNIT,
    WATCHDOG_S,
    alive_in_ns,
    mark,
    message,
    poll,
    props,
    reset,
    standin_config,
    standin_file,
    standin_info,
    standin_pids,
    status_line,
    unit_entries,
    unit_journal,
    wait_active,
    write_config,
)
from systemd_harness import MEASUREMENTS, Namespace, wait_monotonic

pytestmark = pytest.mark.systemd


@pytest.fixture
def ns(nika_ns: Namespace) -> Iterator[Namespace]:
    """The shared namespace, with the unit stopped and reset before and after the test."""
    reset(nika_ns)
    yield nika_ns
    reset(nika_ns)


def models(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def start_ready(ns: Namespace, cfg: dict[str, Any]) -> str:
    """Write cfg, `systemctl start` (blocks until READY=1), return MainPID."""
    write_config(ns, cfg)
    ns.systemctl("start", UNIT, timeout=120)
    return wait_active(ns, 5)


def test_start_returns_once_the_model_answers(ns: Namespace) -> None:
    """`systemctl start` blocks while the server loads and returns only after /v1/models
    lists the alias; the unit is `activating` in between, and the model answers at once."""
    cfg = standin_config(vllm={"env": {"STANDIN_BIND_DELAY_S": "3",
                                       "STANDIN_LIST_DELAY_S": "1.5"}})
    write_config(ns, cfg)
    port = cfg["vllm"]["port"]
    done: list[float] = []
    t0 = time.monotonic()

    def start() -> None:
        ns.systemctl("start", UNIT, timeout=120)
        done.append(time.monotonic())

    starter = threading.Thread(target=start)
    starter.start()
    poll_for(lambda: standin_file(ns, "bound_at"), 30, "the stand-in to bind its port")
    listed_at = float(poll_for(lambda: standin_file(ns, "listed_at"), 5, "listed_at"))
    # Bound but not listing the alias yet (listed_at is when listing begins): not ready.
    assert time.monotonic() < listed_at - 0.2, "too late to look at the loading phase"
    state_while_listing_nothing = props(ns, "ActiveState")["ActiveState"]
    assert time.monotonic() < listed_at, "the sample was taken after listing began"
    starter.join(60)
    assert done, "systemctl start did not return"
    t_return = done[0]
    bound_at = float(standin_file(ns, "bound_at") or "nan")

    assert state_while_listing_nothing == "activating", state_while_listing_nothing
    assert t_return >= listed_at, "systemctl start returned before the alias was listed"
    assert "nika" in models(port)
    assert props(ns, "ActiveState")["ActiveState"] == "active"
    lag = t_return - listed_at
    MEASUREMENTS["start: systemctl start returned after (s)"] = round(t_return - t0, 3)
    MEASUREMENTS["start: stand-in bound its port after (s)"] = round(bound_at - t0, 3)
    MEASUREMENTS["start: stand-in listed the alias after (s)"] = round(listed_at - t0, 3)
    MEASUREMENTS["start: return minus alias listed (s)"] = round(lag, 3)
    assert lag < 2.0, f"start returned {lag:.2f}s after the alias was listed"


def test_status_shows_phase_alias_restarts(ns: Namespace) -> None:
    """`systemctl status` shows the daemon's STATUS= line: phase, alias, port and restart
    count, and after a crash of the server the count and the reason."""
    cfg = standin_config()
    port = cfg["vllm"]["port"]
    start_ready(ns, cfg)
    line = status_line(ns)
    assert re.fullmatch(rf"ready: nika on 127\.0\.0\.1:{port} \(up [^)]*\); restarts=0", line), \
        line
    assert f'Status: "{line}' in ns.systemctl("status", UNIT, check=False).stdout

    api = int(standin_file(ns, "api.pid") or 0)
    os.kill(ns.host_pid(api), signal.SIGKILL)
    def restarted() -> str | None:
        s = status_line(ns)
        return s if s.startswith("ready:") and "restarts=1" in s else None

    after = poll(restarted, 30, "STATUS after the restart")
    assert "last failure" in after, after
    shown = ns.run(["/opt/nika-supervisor/bin/nika-supervisor", "status"]).stdout
    assert "restarts: 1" in shown and "phase: ready" in shown, shown


def test_reload_applies_a_changed_config(ns: Namespace) -> None:
    """`systemctl reload` with a changed launch setting restarts vLLM with the new argv under
    the same daemon; while the new vLLM loads the unit is "reloading", not "active" (READY=1
    comes only when it answers), and then active again."""
    cfg = standin_config()
    main = start_ready(ns, cfg)
    api = standin_file(ns, "api.pid")
    cfg["vllm"]["args"] = {"max-model-len": 4096}
    cfg["vllm"]["env"]["STANDIN_BIND_DELAY_S"] = "3"  # a visible load
    write_config(ns, cfg)
    c = mark()
    ns.systemctl("reload", "--no-block", UNIT)
    poll(lambda: props(ns, "ActiveState")["ActiveState"] == "reloading", 10,
         "the unit to be reloading while the new vLLM loads")
    poll(lambda: "supervisor.reloaded" in unit_journal(ns, c), 15, "supervisor.reloaded")
    poll(lambda: standin_file(ns, "api.pid") not in (None, api) and
             "vllm.ready" in unit_journal(ns, c), 30, "vLLM restarted with the new config")
    poll(lambda: props(ns, "ActiveState")["ActiveState"] == "active", 10,
         "the unit to be active again once the new vLLM answers")
    info = standin_info(ns) or {}
    argv = info.get("argv", [])
    assert "--max-model-len" in argv and "4096" in argv, argv
    assert "restart_vllm=true" in unit_journal(ns, c)
    p = props(ns, "ActiveState", "MainPID", "NRestarts")
    assert p == {"ActiveState": "active", "MainPID": main, "NRestarts": "0"}, p


def test_reload_with_broken_yaml_keeps_the_old_config(ns: Namespace) -> None:
    """A reload with a broken file keeps vLLM and the old config running, and says so with
    the file's line number in the journal and in STATUS."""
    cfg = standin_config()
    port = cfg["vllm"]["port"]
    main = start_ready(ns, cfg)
    api = standin_file(ns, "api.pid")
    good = ns.path(CONFIG).read_text()
    broken = good + "restart: {backoff_initial: 1s\n"  # an unclosed flow mapping
    write_config(ns, broken)
    line_no = broken.count("\n")  # the error is reported at the end of the file or near it
    c = mark()
    ns.systemctl("reload", UNIT)
    poll(lambda: "supervisor.reload_rejected" in unit_journal(ns, c), 15,
             "supervisor.reload_rejected")
    journal = unit_journal(ns, c)
    m = re.search(rf"{re.escape(CONFIG)}:(\d+):(\d+): ", journal)
    assert m, journal
    assert abs(int(m.group(1)) - line_no) <= 1, (m.group(0), line_no)
    poll(lambda: "reload rejected" in status_line(ns), 5, "STATUS to say reload rejected")
    assert status_line(ns).startswith("ready:")
    wait_monotonic(1.0)  # nothing may restart as a consequence
    assert standin_file(ns, "api.pid") == api
    assert "nika" in models(port)
    p = props(ns, "ActiveState", "MainPID")
    assert p == {"ActiveState": "active", "MainPID": main}, p


def test_watchdog_restarts_a_frozen_daemon(ns: Namespace) -> None:
    """SIGSTOP of the daemon: systemd's watchdog fires within WatchdogSec plus a margin,
    kills the daemon and everything left in the cgroup (the old vLLM included), and
    Restart= brings the unit back, ready, with a new daemon."""
    main = start_ready(ns, standin_config())
    old = standin_pids(ns)
    assert alive_in_ns(ns, old), "no stand-in running"
    c = mark()
    t0 = time.monotonic()
    os.kill(ns.host_pid(int(main)), signal.SIGSTOP)
    poll(lambda: "Watchdog timeout" in unit_journal(ns, c), WATCHDOG_S + 5,
             "systemd's watchdog to fire")
    detected = time.monotonic() - t0
    def back_with_new_daemon() -> str | None:
        p = props(ns, "ActiveState", "MainPID")
        return p["MainPID"] if p["ActiveState"] == "active" and p["MainPID"] != main else None

    new_main = poll(back_with_new_daemon, RESTART_S + 30, "the unit back with a new daemon")
    back = time.monotonic() - t0
    MEASUREMENTS["watchdog: SIGSTOP to 'Watchdog timeout' (s)"] = round(detected, 1)
    MEASUREMENTS["watchdog: SIGSTOP to active again (s)"] = round(back, 1)
    assert not alive_in_ns(ns, old), "the old vLLM group survived the watchdog kill"
    assert props(ns, "NRestarts")["NRestarts"] == "1"
    assert new_main != main
    journal = unit_journal(ns, c)
    assert "ABRT" in journal, journal[-2000:]
    # systemd (KillMode=mixed) killed the old group, not the new daemon's orphan sweep
    assert "vllm.orphans_killed" not in journal, journal[-2000:]


def test_invalid_config_exits_78_and_is_not_restarted(ns: Namespace) -> None:
    """An invalid config: the daemon exits 78 with `file:line:col` errors, the unit fails,
    and systemd does not restart it (RestartPreventExitStatus=), even after RestartSec."""
    cfg = standin_config()
    cfg["vllm"]["port"] = 70000
    cfg["health"]["no_such_key"] = 1
    write_config(ns, cfg)
    c = mark()
    res = ns.systemctl("start", UNIT, check=False)
    assert res.returncode != 0
    p = props(ns, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert p == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                 "NRestarts": "0"}, p
    journal = unit_journal(ns, c)
    assert re.search(rf"{re.escape(CONFIG)}:\d+:\d+: .*port", journal), journal
    assert re.search(rf"{re.escape(CONFIG)}:\d+:\d+: .*no_such_key", journal), journal
    wait_monotonic(RESTART_S + 3)  # long enough for a restart that must not happen
    assert props(ns, "ActiveState", "NRestarts") == {"ActiveState": "failed",
                                                     "NRestarts": "0"}
    starts = unit_journal(ns, c).count("Starting nika-vllm")
    assert starts == 1, starts
    assert not standin_pids(ns), "something was started despite the invalid config"


def test_always_crashing_server_hits_the_start_limit(ns: Namespace) -> None:
    """A server that always dies at startup: the daemon backs off, gives up (exit 69),
    systemd restarts the daemon RestartSec later, and after StartLimitBurst starts the unit
    stays failed ("Start request repeated too quickly"). Reports the starts of the first
    minute."""
    cfg = standin_config(vllm={"env": {"STANDIN_STARTUP_EXIT_CODE": "1"}},
                         restart={"backoff_initial": "1s", "backoff_max": "2s",
                                  "max_restarts": 2, "window": "5m"})
    write_config(ns, cfg)
    c = mark()
    t0 = time.monotonic()
    ns.systemctl("start", "--no-block", UNIT)
    limit = START_LIMIT_BURST * (RESTART_S + 15) + 30
    # systemd 252 keeps Result=exit-code when the limit stops an automatic restart; the
    # journal says "Start request repeated too quickly".
    poll(lambda: "Start request repeated too quickly" in unit_journal(ns, c) and
             props(ns, "ActiveState")["ActiveState"] == "failed", limit,
             "the unit to hit its start limit")
    took = time.monotonic() - t0
    entries = unit_entries(ns, c)
    first_minute = [e for e in entries
                    if int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 - t0 <= 60.0]

    def count(entries: list[dict[str, Any]], prefix: str) -> int:
        return sum(1 for e in entries if message(e).startswith(prefix))

    unit_starts = count(entries, "Starting nika-vllm")
    MEASUREMENTS["crash loop: unit starts in the first minute"] = count(
        first_minute, "Starting nika-vllm")
    MEASUREMENTS["crash loop: vLLM spawns in the first minute"] = count(
        first_minute, "vllm.spawned")
    MEASUREMENTS["crash loop: daemon give-ups (exit 69) in the first minute"] = count(
        first_minute, "supervisor.gave_up")
    MEASUREMENTS["crash loop: start limit hit after (s)"] = round(took, 1)
    text = "\n".join(message(e) for e in entries)
    assert unit_starts == START_LIMIT_BURST, text[-3000:]
    assert count(entries, "supervisor.gave_up") == START_LIMIT_BURST, text[-3000:]
    assert "status=69" in text, text[-3000:]
    assert "Start request repeated too quickly" in text, text[-3000:]
    # the daemon's own backoff: max_restarts=2 means 3 spawns in the first daemon run; each
    # later run reads those restarts back from the history (issue 11: a crash loop slows down
    # across daemon restarts instead of starting over) and gives up at its first failure
    runs: list[list[str]] = []
    for e in entries:
        if message(e).startswith("supervisor.starting"):
            runs.append([])
        if runs:
            runs[-1].append(message(e))
    spawns = [sum(1 for m in run if m.startswith("vllm.spawned")) for run in runs]
    carried = [any(m.startswith("restart.budget_carried") for m in run) for run in runs]
    assert spawns == [3] + [1] * (START_LIMIT_BURST - 1), (spawns, text[-3000:])
    assert carried == [False] + [True] * (START_LIMIT_BURST - 1), (carried, text[-3000:])
    p = props(ns, "ActiveState", "NRestarts", "ExecMainStatus")
    assert p == {"ActiveState": "failed", "NRestarts": str(START_LIMIT_BURST),
                 "ExecMainStatus": "69"}, p


def test_stop_leaves_nothing_in_the_cgroup(ns: Namespace) -> None:
    """`systemctl stop` with an engine and workers that ignore SIGTERM: the daemon escalates
    to SIGKILL, and stop returns within TimeoutStopSec with nothing left in the cgroup."""
    cfg = standin_config(vllm={"env": {"STANDIN_WORKERS": "2",
                                       "STANDIN_ENGINE_IGNORE_TERM": "1"}},
                         restart={"stop_timeout": "3s"})
    start_ready(ns, cfg)
    before = ns.unit_pids(UNIT)
    assert len(before) >= 5, f"expected daemon, server, engine, 2 workers: {before}"
    c = mark()
    t0 = time.monotonic()
    ns.systemctl("stop", UNIT, timeout=TIMEOUT_STOP_S + 30)
    took = time.monotonic() - t0
    left = ns.unit_pids(UNIT)
    MEASUREMENTS["stop: with SIGTERM-ignoring engine, stop_timeout 3s (s)"] = round(took, 2)
    assert not left, f"left in the cgroup after stop: {left}"
    assert not [p for p in before if os.path.exists(f"/proc/{p}")]
    assert took < TIMEOUT_STOP_S, took
    p = props(ns, "ActiveState", "Result", "ExecMainStatus")
    assert p == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, p
    assert "SIGKILL" in unit_journal(ns, c), "the daemon should have escalated to SIGKILL"


def test_journal_priorities_and_vllm_output(ns: Namespace) -> None:
    """`journalctl -p warning` shows the daemon's warnings and none of its info lines, and
    vLLM's own output is in the unit's journal."""
    c = mark()
    start_ready(ns, standin_config())
    api = int(standin_file(ns, "api.pid") or 0)
    os.kill(ns.host_pid(api), signal.SIGKILL)
    poll(lambda: unit_journal(ns, c).count("vllm.ready") >= 2, 30,
             "vLLM restarted after the kill")
    warnings = unit_journal(ns, c, "-p", "warning")
    everything = unit_journal(ns, c)
    assert "restart.scheduled" in warnings, warnings
    for info_event in ("vllm.ready", "vllm.spawned", "supervisor.starting"):
        assert info_event in everything
        assert info_event not in warnings, f"{info_event} shown at -p warning:\n{warnings}"
    assert re.search(r"\(APIServer pid=\d+\) INFO .*Starting vLLM server", everything), \
        "vLLM's own output is missing from the journal"
    prio = {message(e).split(" ", 1)[0]: e.get("PRIORITY") for e in unit_entries(ns, c)}
    assert prio.get("restart.scheduled") == "4" and prio.get("vllm.ready") == "6", prio


def test_a_load_longer_than_timeout_start_sec_is_not_killed(ns: Namespace) -> None:
    """While the model loads, the daemon's EXTEND_TIMEOUT_USEC keeps systemd's start timeout
    alive: with TimeoutStartSec cut to 5s by a drop-in, a 12s load still ends active."""
    dropin = f"/etc/systemd/system/{UNIT}.d/short-start.conf"
    ns.write(dropin, "[Service]\nTimeoutStartSec=5s\n")
    try:
        ns.systemctl("daemon-reload")
        assert props(ns, "TimeoutStartUSec")["TimeoutStartUSec"] == "5s"
        write_config(ns, standin_config(vllm={"env": {"STANDIN_BIND_DELAY_S": "12"}}))
        c = mark()
        t0 = time.monotonic()
        ns.systemctl("start", UNIT, timeout=120)
        took = time.monotonic() - t0
        wait_active(ns, 5)
        assert took > 12, took
        journal = unit_journal(ns, c)
        assert "timed out" not in journal, journal[-2000:]
        assert props(ns, "NRestarts")["NRestarts"] == "0"
    finally:
        ns.path(dropin).unlink()
        ns.systemctl("daemon-reload")
