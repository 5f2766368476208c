"""Faults of the server and what the daemon does about them: crash, hang, unrequested exit,
failed starts, dead engine, slow or wrong answers. The required cases of issue 2."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import group_alive, group_members, pid_alive, poll_for, write_config

pytestmark = pytest.mark.process


def standin_pids(d) -> tuple[int, list[int]]:
    info = d.standin.info()
    assert info is not None
    return info["pid"], [info["pid"], info["engine_pid"], *info.get("worker_pids", [])]


def assert_restarted_cleanly(d, notify, old_api: int, old_pids: list[int], since: float) -> None:
    """A new vLLM was spawned and got ready; no process of the old group was alive when it
    started (the stand-in records survivors of its state dir at start) or is alive now."""
    spawned = d.wait_event("vllm.spawned", since=since, pid=lambda p: p != old_api)
    d.wait_event("vllm.ready", timeout=15, since=spawned.t, pid=spawned["pid"])
    notify.wait_key("READY", "1", timeout=5, since=since)
    info = poll_for(lambda: (i := d.standin.info()) and i["pid"] == spawned["pid"] and i, 5,
                    "the new stand-in's api.json")
    assert info["preexisting"] == [], f"survivors of the old group at the new start: {info}"
    assert not group_members(old_api)
    assert not [p for p in old_pids if pid_alive(p)]


def test_sigkill_of_the_server_restarts_with_nothing_left(ready_daemon, notify_socket) -> None:
    """SIGKILL of the API server: detected as an unrequested exit, the surviving EngineCore and
    Worker of its group are ended, and a new server starts only after that."""
    d = ready_daemon(standin_env={"STANDIN_WORKERS": "1"})
    api, pids = standin_pids(d)
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    t0 = d.events[-1].t
    os.kill(api, signal.SIGKILL)
    exited = d.wait_event("vllm.exited", since=t0, pid=api)
    assert exited["requested"] is False and exited["signal"] == "SIGKILL"
    assert exited["returncode"] is None
    sched = d.wait_event("restart.scheduled", since=t0)
    assert sched["attempt"] == 1 and 0 < sched["delay_s"] <= 1.0
    assert_restarted_cleanly(d, notify_socket, api, pids, t0)
    status = notify_socket.fields("STATUS")[-1]
    assert "restarts=1" in status and "SIGKILL" in status, status
    state = d.state_file()
    assert state is not None and state["restarts"] == 1
    assert "SIGKILL" in state["last_failure"]["cause"]


def test_sigstop_hang_is_detected_within_the_bound(ready_daemon, notify_socket) -> None:
    """SIGSTOP of the API server: failed probes are counted and the restart is decided within
    interval x failure_threshold + timeout (+1 s for scheduling), then the stopped group is
    ended and a new server gets ready."""
    d = ready_daemon(restart={"stop_timeout": "1s"})
    api, pids = standin_pids(d)
    t0 = d.events[-1].t
    os.kill(api, signal.SIGSTOP)
    sched = d.wait_event("restart.scheduled", timeout=10, since=t0)
    bound = 0.2 * 3 + 1.0
    took = sched.t - t0
    assert took <= bound + 1.0, f"hang detected after {took:.2f}s, bound {bound:.2f}s"
    failed = d.events_named("health.failed", since=t0)
    assert [e["consecutive"] for e in failed][:3] == [1, 2, 3]
    assert_restarted_cleanly(d, notify_socket, api, pids, t0)


def test_unrequested_exit_zero_restarts(ready_daemon, notify_socket) -> None:
    """An exit with code 0 that the daemon did not ask for is a failure: vLLM is restarted."""
    d = ready_daemon()
    api, pids = standin_pids(d)
    t0 = d.events[-1].t
    d.standin.control(exit=0)
    exited = d.wait_event("vllm.exited", since=t0, pid=api)
    assert exited["returncode"] == 0 and exited["requested"] is False
    assert "0" in exited["cause"]
    d.wait_event("restart.scheduled", since=t0)
    assert_restarted_cleanly(d, notify_socket, api, pids, t0)


def test_failed_starts_back_off_then_give_up(tmp_path: Path, start_daemon,
                                             notify_socket) -> None:
    """A server that exits during startup every time: restarts with growing, capped delays
    (the next start waits at least the announced delay), then the daemon gives up with exit
    code 69, says why in STATUS and the state file, and never sends READY=1."""
    replay = tmp_path / "replay.txt"
    replay.write_text("ERROR 11-27 07:00:00 [standin.py:9] simulated startup failure\n")
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_STARTUP_EXIT_CODE": "1",
                                               "STANDIN_STARTUP_STDERR": str(replay)}},
                       restart={"backoff_initial": "200ms", "backoff_max": "500ms"})
    d = start_daemon(cfg, notify=notify_socket)
    assert d.wait_exit(30) == 69, d.tail()
    spawned = d.events_named("vllm.spawned")
    exited = d.events_named("vllm.exited")
    scheduled = d.events_named("restart.scheduled")
    assert len(spawned) == 4 and len(exited) == 4 and len(scheduled) == 3, d.tail()
    assert all(e["returncode"] == 1 and e["requested"] is False for e in exited)
    delays = [e["delay_s"] for e in scheduled]
    assert [e["attempt"] for e in scheduled] == [1, 2, 3]
    assert delays == sorted(delays) and delays[-1] <= 0.5 and delays[0] < delays[1], delays
    for ex, sched, nxt in zip(exited[:-1], scheduled, spawned[1:], strict=True):
        assert nxt.t - ex.t >= sched["delay_s"] - 0.02, "started again before the backoff"
    gave_up = d.wait_event("supervisor.gave_up")
    assert gave_up["level"] == "error"
    assert notify_socket.first("READY") is None
    status = notify_socket.fields("STATUS")[-1]
    assert "fail" in status and "restarts=3" in status, status
    state = d.state_file()
    assert state is not None and state["phase"] == "failed"
    stderr_lines = d.vllm_output("stderr")
    assert stderr_lines.count(replay.read_text().strip()) == 4


def test_exit_while_loading_counts_as_a_failed_start(tmp_path: Path, start_daemon) -> None:
    """A server that dies while loading (before binding) is restarted, then given up on."""
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_BIND_DELAY_S": "5",
                                               "STANDIN_EXIT_AFTER_S": "0.3",
                                               "STANDIN_EXIT_CODE": "1"}},
                       restart={"max_restarts": 1})
    d = start_daemon(cfg)
    assert d.wait_exit(20) == 69, d.tail()
    exited = d.events_named("vllm.exited")
    assert len(exited) == 2 and all("loading" in e["cause"] for e in exited), d.tail()
    assert not d.events_named("vllm.ready")


def test_startup_timeout_kills_the_server(tmp_path: Path, start_daemon) -> None:
    """A server that never lists the alias is killed when health.startup_timeout passes, and
    that counts as a failed start."""
    cfg = write_config(tmp_path, vllm={"env": {"STANDIN_LIST_DELAY_S": "60"}},
                       health={"startup_timeout": "1s"}, restart={"max_restarts": 0})
    d = start_daemon(cfg)
    assert d.wait_exit(20) == 69, d.tail()
    gave_up = d.wait_event("supervisor.gave_up")
    assert "startup_timeout" in gave_up["reason"]
    api = d.events_named("vllm.spawned")[0]["pid"]
    assert not group_alive(api)
    exited = d.wait_event("vllm.exited", pid=api)
    assert exited["requested"] is True


def test_health_503_restarts_at_once(ready_daemon, notify_socket) -> None:
    """/health 503 (engine dead) restarts after the first such answer, not after
    failure_threshold of them."""
    d = ready_daemon()
    api, pids = standin_pids(d)
    t0 = d.events[-1].t
    d.standin.control(dead=True)
    failed = d.wait_event("health.failed", since=t0)
    assert failed["consecutive"] == 1 and failed["probe"] == "health"
    assert "503" in failed["reason"]
    sched = d.wait_event("restart.scheduled", since=t0)
    assert sched.t - t0 <= 0.2 + 1.0 + 0.5
    assert len([e for e in d.events_named("health.failed", since=t0) if e.t < sched.t]) == 1
    assert_restarted_cleanly(d, notify_socket, api, pids, t0)


def test_slow_answers_within_the_timeout_are_not_failures(ready_daemon) -> None:
    """/v1/models answering in 0.6 s with a 1 s timeout: many probes, no failure, no restart."""
    d = ready_daemon(standin_env={"STANDIN_MODELS_DELAY_S": "0.6"})
    api = d.standin.api_pid
    base = d.standin.state()["counts"].get("GET /v1/models", 0)
    poll_for(lambda: d.standin.state()["counts"].get("GET /v1/models", 0) >= base + 6, 10,
             "six more /v1/models probes")
    assert not d.events_named("health.failed")
    assert not d.events_named("restart.scheduled")
    assert d.events_named("vllm.spawned")[-1]["pid"] == api and pid_alive(api)
    assert (d.state_file() or {}).get("phase") == "ready"


def test_answers_slower_than_the_timeout_are_failures(ready_daemon) -> None:
    """/v1/models answering slower than health.timeout: failure_threshold failures, then a
    restart (the counterpart of the test above)."""
    d = ready_daemon()
    t0 = d.events[-1].t
    d.standin.control(models_delay_s=1.5)
    sched = d.wait_event("restart.scheduled", timeout=10, since=t0)
    failed = [e for e in d.events_named("health.failed", since=t0) if e.t <= sched.t]
    assert [e["consecutive"] for e in failed] == [1, 2, 3]
    assert all(e["probe"] == "models" for e in failed), failed


def test_alias_no_longer_listed_is_a_failure(ready_daemon) -> None:
    """/v1/models answering 200 without the alias counts as a failed probe."""
    d = ready_daemon()
    t0 = d.events[-1].t
    d.standin.control(listed=False)
    failed = d.wait_event("health.failed", since=t0)
    assert "nika" in failed["reason"]
    d.wait_event("restart.scheduled", timeout=10, since=t0)


def test_exit_is_detected_as_an_event_not_by_polling(ready_daemon) -> None:
    """With a 30 s probe interval, a crash is still noticed at once: the exit is an event
    (child wait), not something the next health probe finds."""
    d = ready_daemon(health={"interval": "30s", "timeout": "10s"})
    api = d.standin.api_pid
    assert api is not None
    t0 = time.monotonic()
    os.kill(api, signal.SIGKILL)
    # A deadline far below the 30 s interval; how soon (ms) is bench/supervisor_bench.py's.
    exited = d.wait_event("vllm.exited", timeout=5, pid=api)
    assert exited["requested"] is False
    assert not d.events_named("health.failed", since=t0), "a probe found it first"


def test_a_stopped_server_gets_sigcont_after_sigterm(ready_daemon) -> None:
    """A SIGSTOPped server that would exit on SIGTERM is ended promptly (SIGCONT follows the
    SIGTERM, as systemd does), not by SIGKILL after the whole stop_timeout."""
    d = ready_daemon(restart={"stop_timeout": "2s"})
    api = d.standin.api_pid
    assert api is not None
    t0 = time.monotonic()
    os.kill(api, signal.SIGSTOP)
    sched = d.wait_event("restart.scheduled", timeout=10, since=t0)
    exited = d.wait_event("vllm.exited", timeout=10, since=sched.t, pid=api)
    assert exited["signal"] is None and exited["returncode"] == 0, exited.fields
    assert exited.t - sched.t < 1.0
