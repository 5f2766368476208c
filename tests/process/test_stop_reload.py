"""Stopping (SIGTERM), reloading (SIGHUP) and the orphans of a killed daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import (
    group_members,
    pid_alive,
    poll_for,
    read_config,
    rewrite_config,
    write_config,
)

pytestmark = pytest.mark.process


def test_sigterm_stops_cleanly_with_nothing_left(ready_daemon, notify_socket) -> None:
    """SIGTERM: STOPPING=1, vLLM's whole group (API server, engine, workers) ends, the daemon
    exits 0 and, at that moment, no stand-in process is alive."""
    d = ready_daemon(standin_env={"STANDIN_WORKERS": "2"})
    info = d.standin.info()
    assert info is not None
    pids = [info["pid"], info["engine_pid"], *info["worker_pids"]]
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0, d.tail()
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"left running after the daemon exited: {alive}"
    assert not group_members(info["pid"])
    stopping = notify_socket.wait_key("STOPPING", "1", timeout=1, since=t0)
    assert "STATUS" in stopping
    exited = d.wait_event("vllm.exited", pid=info["pid"])
    assert exited["requested"] is True
    stopped = d.wait_event("supervisor.stopped")
    assert stopped["exit_code"] == 0
    assert not d.events_named("restart.scheduled")
    assert (d.state_file() or {}).get("phase") == "stopped"


def test_sigterm_escalates_to_sigkill_after_stop_timeout(ready_daemon) -> None:
    """An engine that ignores SIGTERM is SIGKILLed once restart.stop_timeout passes; the
    daemon still exits 0 with nothing left."""
    d = ready_daemon(standin_env={"STANDIN_ENGINE_IGNORE_TERM": "1"},
                     restart={"stop_timeout": "1s"})
    info = d.standin.info()
    assert info is not None
    t0 = time.monotonic()
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0, d.tail()
    took = time.monotonic() - t0
    assert 1.0 <= took < 4.0, f"stopped after {took:.2f}s with stop_timeout 1s"
    assert not pid_alive(info["engine_pid"])
    assert d.events_named("vllm.signal", signal="SIGKILL")


def test_sighup_without_launch_changes_keeps_vllm(ready_daemon, notify_socket) -> None:
    """SIGHUP with a valid file that changes only health settings: RELOADING=1 with
    MONOTONIC_USEC, supervisor.reloaded without a restart, then READY=1; the same vLLM keeps
    serving."""
    d = ready_daemon()
    api = d.standin.api_pid
    rewrite_config(d.config, health={"interval": "300ms"})
    t0 = time.monotonic()
    d.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_key("RELOADING", "1", timeout=5, since=t0)
    mono_usec = int(reloading.fields["MONOTONIC_USEC"])
    assert abs(mono_usec / 1e6 - reloading.t) < 1.0, "MONOTONIC_USEC is not CLOCK_MONOTONIC"
    ready = notify_socket.wait_key("READY", "1", timeout=5, since=reloading.t)
    assert ready.t >= reloading.t
    reloaded = d.wait_event("supervisor.reloaded", since=t0)
    assert reloaded["restart_vllm"] is False
    base = d.standin.state()["counts"].get("GET /health", 0)
    poll_for(lambda: d.standin.state()["counts"].get("GET /health", 0) >= base + 3, 5,
             "three more health probes")
    assert d.standin.api_pid == api and pid_alive(api)
    assert not d.events_named("vllm.spawned", since=t0)


def test_sighup_with_launch_changes_restarts_vllm(ready_daemon, notify_socket) -> None:
    """SIGHUP with a new vLLM flag: vLLM is stopped (requested) and started with the new argv,
    without backoff or a restart counted as a failure; READY=1 follows RELOADING=1 only once
    the new vLLM answers (systemd shows "reloading", not "active", while the model is down)."""
    d = ready_daemon()
    info = d.standin.info()
    assert info is not None
    old_api, old_engine = info["pid"], info["engine_pid"]
    rewrite_config(d.config, vllm={"args": {"max-num-seqs": 4}})
    t0 = time.monotonic()
    d.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_key("RELOADING", "1", timeout=5, since=t0)
    reloaded = d.wait_event("supervisor.reloaded", since=t0)
    assert reloaded["restart_vllm"] is True
    exited = d.wait_event("vllm.exited", since=t0, pid=old_api)
    assert exited["requested"] is True
    spawned = d.wait_event("vllm.spawned", since=t0)
    assert spawned["argv"][-2:] == ["--max-num-seqs", "4"]
    d.wait_event("vllm.ready", since=spawned.t, pid=spawned["pid"])
    ready = notify_socket.wait_key("READY", "1", timeout=5, since=reloading.t)
    between = [m.get("STATUS") or "" for m in notify_socket.messages
               if reloading.t <= m.t < ready.t]
    assert any(st.startswith("loading") for st in between), between
    assert ready.get("STATUS", "").startswith("ready"), ready.fields
    assert notify_socket.with_key("EXTEND_TIMEOUT_USEC", since=reloading.t)
    new = poll_for(lambda: (i := d.standin.info()) and i["pid"] == spawned["pid"] and i, 5,
                   "the new stand-in")
    assert new["extra_args"] == ["--max-num-seqs", "4"] and new["preexisting"] == []
    assert not pid_alive(old_engine)
    assert not d.events_named("restart.scheduled", since=t0)


def test_sighup_with_an_invalid_file_keeps_the_old_config(ready_daemon, notify_socket) -> None:
    """SIGHUP with an invalid file: the errors are logged with PATH:LINE:COL and shown in
    STATUS, vLLM keeps running on the old config, READY=1 follows; a fixed file then reloads
    and clears the error."""
    d = ready_daemon()
    api = d.standin.api_pid
    good = d.config.read_text()
    d.config.write_text(good.replace("interval: 200ms", "interval: soon"))
    line = next(i for i, text in enumerate(d.config.read_text().splitlines(), 1)
                if "interval: soon" in text)
    t0 = time.monotonic()
    d.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_key("RELOADING", "1", timeout=5, since=t0)
    rejected = d.wait_event("supervisor.reload_rejected", since=t0)
    assert rejected["level"] == "error"
    assert any(e.startswith(f"{d.config}:{line}:") and "health.interval" in e
               for e in rejected["errors"]), rejected["errors"]
    ready = notify_socket.wait_key("READY", "1", timeout=5, since=reloading.t)
    assert "reload rejected" in ready.fields.get("STATUS", ""), ready.fields
    assert "health.interval" in ready.fields["STATUS"]
    assert d.standin.api_pid == api and pid_alive(api)
    assert not d.events_named("vllm.spawned", since=t0)
    assert (d.state_file() or {}).get("config_error")

    d.config.write_text(good)
    t1 = time.monotonic()
    d.send_signal(signal.SIGHUP)
    d.wait_event("supervisor.reloaded", since=t1)
    fixed = notify_socket.wait_key("READY", "1", timeout=5, since=t1)
    assert "reload rejected" not in fixed.fields.get("STATUS", "")
    assert d.standin.api_pid == api


def test_orphans_of_a_killed_daemon_are_ended_by_the_next(tmp_path: Path, start_daemon,
                                                          notify_socket) -> None:
    """After the daemon itself is SIGKILLed its vLLM lives on (own session); the next daemon
    with the same config ends those processes before it starts vLLM again."""
    cfg = write_config(tmp_path)
    first = start_daemon(cfg)
    first.wait_event("vllm.ready", timeout=20)
    info = first.standin.info()
    assert info is not None
    old = [info["pid"], info["engine_pid"]]
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait_exit(5) == -signal.SIGKILL
    assert all(pid_alive(p) for p in old), "the stand-in died with the daemon"
    second = start_daemon(cfg, notify=notify_socket)
    killed = second.wait_event("vllm.orphans_killed", timeout=10)
    assert set(old) <= set(killed["pids"]), killed.fields
    second.wait_event("vllm.ready", timeout=20)
    new = poll_for(lambda: (i := second.standin.info()) and i["pid"] not in old and i, 5,
                   "the new stand-in")
    assert new["preexisting"] == []
    assert not [p for p in old if pid_alive(p)]
    assert read_config(cfg)["vllm"]["port"] == new["port"]
