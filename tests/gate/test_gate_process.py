"""The gate as a process: respawned on the same socket after a crash (connects never
refused), malformed control lines on both sides, the API key, settings on reload."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from gatehelp import GateExited, GateRun, GateStarted, gate_config
from helpers import poll_for

from nika_supervisor.gate.process import _Channel, bind
from nika_supervisor.gate.protocol import GateStats

pytestmark = pytest.mark.process


def get(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def ready_standin(run_standin: Callable[..., Any], **kw: Any) -> Any:
    s = run_standin(**kw)
    poll_for(lambda: s.state.get("/health")[0] == 200, 15, "the stand-in to answer")
    return s


def test_gate_crash_is_respawned_on_the_same_socket(
        run_standin: Callable[..., Any], make_gate: Callable[..., GateRun]) -> None:
    """SIGKILL of the gate under a client hammering connects: not one ECONNREFUSED, the
    respawned gate (a new pid) serves the same port and gets the current view again."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    g.view("ready")
    counts = {"ok": 0, "refused": 0, "reset": 0, "other": 0}
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            c = socket.socket()
            c.settimeout(10)
            try:
                c.connect(("127.0.0.1", g.port))
                c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := c.recv(65536):  # the whole answer (Connection: close)
                    data += chunk
                if not data:  # accepted by the gate that was killed, closed unanswered
                    counts["reset"] += 1
                else:
                    counts["ok" if data.startswith(b"HTTP/1.1 200") else "other"] += 1
            except ConnectionRefusedError:
                counts["refused"] += 1
            except (ConnectionResetError, BrokenPipeError):
                counts["reset"] += 1  # accepted by the gate that was killed, mid-request
            finally:
                c.close()

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    poll_for(lambda: counts["ok"] >= 20, 10, "traffic through the first gate")
    served_before = poll_for(lambda: g.proc.stats.served, 5, "served counted")
    old = g.kill_gate()
    exited = g.wait_for(GateExited)
    assert exited.pid == old and exited.signal == 9 and exited.respawn_in_s is not None
    started = g.wait_for(GateStarted)
    assert started.pid != old
    before = counts["ok"]
    poll_for(lambda: counts["ok"] >= before + 20, 10, "traffic through the respawned gate")
    stop.set()
    t.join(15)
    assert counts["refused"] == 0, counts
    # the counters STATUS shows are since the daemon started, not since the last respawn
    poll_for(lambda: g.proc.stats.served >= served_before + 20, 5,
             f"served to count on from {served_before}")
    assert counts["other"] == 0, counts
    # at most the connection(s) the dying gate had accepted when it was killed
    assert counts["reset"] <= 2, counts
    print(f"respawn under load: {counts}")


def test_daemon_side_survives_malformed_lines(tmp_path: Path) -> None:
    """Garbage from the gate is logged and skipped; the next good line still counts."""
    ours, theirs = socket.socketpair()
    got: list[dict[str, object]] = []
    bad: list[str] = []
    _Channel(ours, got.append, bad.append)
    theirs.sendall(b"not json\n[1,2]\n{\"type\":\"bogus\"}\n" + b"x" * 70000 + b"\n"
                   + GateStats(in_flight=3).to_line())
    poll_for(lambda: got, 5, "the good line")
    assert got[0]["in_flight"] == 3
    assert [b.split(" ")[0] for b in bad] == ["not", "not", "unknown", "1"], bad
    theirs.close()


def test_gate_side_survives_malformed_lines(run_standin: Callable[..., Any],
                                            make_gate: Callable[..., GateRun]) -> None:
    """Garbage from the daemon is logged by the gate, which keeps serving and still takes the
    next good view."""
    s = ready_standin(run_standin)
    g = make_gate(s.port)
    chan = g.proc._chan
    assert chan is not None
    for line in (b"{oops\n", b"42\n", b'{"type":"view","ready":"yes"}\n',
                 b'{"type":"drain","timeout":"soon"}\n', b"y" * 100000 + b"\n"):
        chan.send(line)
    g.view("ready")
    assert get(g.url + "/v1/models") == 200
    errors = [e["error"] for e in g.events_named("gate.control_malformed")]
    assert len(errors) == 5, errors
    assert g.proc.pid is not None


def test_api_key_is_enforced_on_model_routes(tmp_path: Path, run_standin: Callable[..., Any],
                                             make_gate: Callable[..., GateRun]) -> None:
    """With vllm.api_key_file: /v1/* and /api/* need the key (Bearer), /health and /metrics
    stay open on loopback; the key appears in no log line."""
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    s = ready_standin(run_standin, env={"VLLM_API_KEY": "s3cret-key",
                                        "STANDIN_REQUIRE_KEY": "1"})
    g = make_gate(s.port, vllm=f"api_key_file: {key_file}\n")
    g.view("ready")
    auth = {"Authorization": "Bearer s3cret-key"}
    assert get(g.url + "/v1/models") == 401
    assert get(g.url + "/v1/models", {"Authorization": "Bearer wrong"}) == 401
    assert get(g.url + "/v1/models", auth) == 200
    assert get(g.url + "/api/tags") == 401
    assert get(g.url + "/api/tags", auth) == 200
    assert get(g.url + "/health") == 200 and get(g.url + "/metrics") == 200
    req = urllib.request.Request(g.url + "/api/chat", data=json.dumps(
        {"model": "nika", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    ).encode(), headers=auth)
    with urllib.request.urlopen(req, timeout=10) as r:  # the gate adds the key towards vLLM
        assert json.loads(r.read())["message"]["content"] == "pong"
    assert "s3cret" not in g.log_path.read_text()


def test_bind_failure_names_the_address() -> None:
    """A public address already taken is a GateBindError naming it, and nothing stays open."""
    taken = bind((("127.0.0.1", 0),))
    port = taken[0].getsockname()[1]
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
        bind((("127.0.0.1", 0), ("127.0.0.1", port)))
    taken[0].close()


def test_reload_settings_apply_without_respawn(make_gate: Callable[..., GateRun]) -> None:
    """update(): a new hold_timeout applies in the running gate; a new listen address is
    reported as needing a restart."""
    g = make_gate(1, gate="hold_timeout: 10s\n")
    pid = g.proc.pid
    g.view("loading")
    new = gate_config(1, g.port, gate="hold_timeout: 200ms\n")
    assert g.proc.update(new) is True
    t0 = time.monotonic()
    poll_for(lambda: get(g.url + "/v1/models") == 503, 5, "the shorter hold")
    assert time.monotonic() - t0 < 3.0 and g.proc.pid == pid
    assert g.proc.update(gate_config(1, g.port + 1)) is False


def test_doctor_checks_the_gate_addresses() -> None:
    """doctor: each gate.listen address is free (ok) or held by something else (fail)."""
    from nika_supervisor.doctor import Status, _Facts, check_gate_ports

    held = bind((("127.0.0.1", 0),))
    port = held[0].getsockname()[1]
    from helpers import free_port
    free = free_port()
    cfg = gate_config(free_port(), port)
    [c] = check_gate_ports(_Facts(cfg, {}))
    assert (c.name, c.status) == ("gate_port", Status.FAIL) and str(port) in c.detail
    held[0].close()
    [c] = check_gate_ports(_Facts(gate_config(free_port(), free), {}))
    assert c.status is Status.OK
    assert check_gate_ports(_Facts(replace(cfg, gate=None), {})) == []


def test_a_wedged_gate_is_killed_and_respawned(run_standin: Callable[..., Any],
                                               make_gate: Callable[..., GateRun]) -> None:
    """A gate whose event loop stops answering pings (SIGSTOP here) is SIGKILLed after
    unresponsive_after and respawned on the same socket; a request sent meanwhile is served
    by the new gate."""
    import os
    import signal

    s = ready_standin(run_standin)
    g = make_gate(s.port, unresponsive_after=1.0)
    g.view("ready")
    old = g.proc.pid
    assert old is not None
    os.kill(old, signal.SIGSTOP)
    t0 = time.monotonic()
    status: list[int] = []
    t = threading.Thread(target=lambda: status.append(get(g.url + "/v1/models")), daemon=True)
    t.start()
    exited = g.wait_for(GateExited, 10)
    assert exited.pid == old and exited.signal == 9
    started = g.wait_for(GateStarted, 10)
    assert started.pid != old
    t.join(10)
    assert status == [200]
    assert 1.0 <= time.monotonic() - t0 < 8.0


def test_garbage_from_upstream_is_a_502(make_gate: Callable[..., GateRun]) -> None:
    """An upstream that answers something that is not HTTP gives the client a 502 with an
    OpenAI-style error (and Ollama routes Ollama's), never a bare 500 from the server library."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.recv(65536)
            c.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        g = make_gate(srv.getsockname()[1])
        g.view("ready")
        req = urllib.request.Request(g.url + "/v1/models")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 502
        assert json.loads(e.value.read())["error"]["type"] == "bad_gateway"
        req = urllib.request.Request(g.url + "/api/chat", data=json.dumps(
            {"model": "nika", "messages": [{"role": "user", "content": "x"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 502 and "cannot relay" in json.loads(e.value.read())["error"]
    finally:
        stop.set()
        t.join(5)
        srv.close()
