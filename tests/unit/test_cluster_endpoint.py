"""The control endpoint (nika_supervisor/cluster/endpoint.py) on 127.0.0.1: the token, bodies,
the bind address, and peers that answer garbage or nothing (the client returns an error value
within its deadline, never hangs)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from nika_supervisor.cluster import endpoint
from nika_supervisor.cluster.endpoint import (
    ControlClient,
    ControlServer,
    PeerError,
    Reply,
    RestartRequest,
)
from nika_supervisor.cluster.token import Token

SECRET = b"s3cret-cluster-token-1107"


@pytest.fixture
def server() -> Iterator[tuple[ControlServer, list[RestartRequest]]]:
    asked: list[RestartRequest] = []

    def on_restart(req: RestartRequest) -> bool:
        asked.append(req)
        return req.epoch == 4

    srv = ControlServer(("127.0.0.1", 0), Token(SECRET),
                        status=lambda: {"node_rank": 1, "epoch": 4, "phase": "ready", "pid": 99},
                        on_restart=on_restart).start()
    yield srv, asked
    srv.stop()


def raw_request(addr: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out


def test_status_and_restart_with_the_token(server: Any) -> None:
    srv, asked = server
    client = ControlClient(Token(SECRET))
    assert client.status(srv.address) == Reply(200, {"node_rank": 1, "epoch": 4,
                                                     "phase": "ready", "pid": 99})
    assert client.ask_restart(srv.address, 4, 1, "exited (SIGKILL)") == Reply(
        200, {"accepted": True})
    assert client.ask_restart(srv.address, 3, 1, "stale") == Reply(200, {"accepted": False})
    assert [(r.epoch, r.rank, r.cause) for r in asked] == [(4, 1, "exited (SIGKILL)"),
                                                            (3, 1, "stale")]
    assert asked[0].peer.startswith("127.0.0.1:")


def test_missing_or_bad_token_is_refused_and_logged_without_the_token(server: Any) -> None:
    srv, asked = server
    wrong = b"not-the-token"
    with capture_logs() as logs:
        bad = ControlClient(Token(wrong))
        assert bad.status(srv.address) == PeerError(
            "401 refused: the peer does not accept this node's token")
        assert isinstance(bad.ask_restart(srv.address, 4, 1, "x"), PeerError)
        missing = raw_request(srv.address, b"GET /cluster/status HTTP/1.0\r\n\r\n")
    assert missing.startswith(b"HTTP/1.0 401")
    assert asked == []  # a refused restart never reaches the daemon
    refused = [e for e in logs if e["event"] == "cluster.control_refused"]
    assert [(e["reason"], e["status"], e["path"]) for e in refused] == [
        ("bad token", 401, "/cluster/status"), ("bad token", 401, "/cluster/restart"),
        ("missing token", 401, "/cluster/status")]
    assert all(e["peer"].startswith("127.0.0.1:") for e in refused)
    text = repr(logs)
    assert SECRET.decode() not in text and wrong.decode() not in text


def test_bodies_are_checked_and_size_limited(server: Any) -> None:
    srv, asked = server
    auth = b"Authorization: Bearer " + SECRET + b"\r\n"

    def post(body: bytes, length: bytes | None = None) -> bytes:
        cl = b"Content-Length: " + (length or str(len(body)).encode()) + b"\r\n"
        return raw_request(srv.address, b"POST /cluster/restart HTTP/1.0\r\n" + auth + cl
                           + b"\r\n" + body)

    with capture_logs() as logs:
        assert post(b"x" * (endpoint.MAX_BODY + 1)).startswith(b"HTTP/1.0 413")
        assert post(b"{not json").startswith(b"HTTP/1.0 400")
        assert post(json.dumps({"epoch": -1, "rank": 1}).encode()).startswith(b"HTTP/1.0 400")
        assert post(json.dumps({"epoch": True, "rank": 1}).encode()).startswith(b"HTTP/1.0 400")
        assert post(b"[]").startswith(b"HTTP/1.0 400")
        assert post(b"{}", b"lots").startswith(b"HTTP/1.0 411")
        long_cause = json.dumps({"epoch": 4, "rank": 1, "cause": "c" * 1000}).encode()
        assert post(long_cause).startswith(b"HTTP/1.0 200")
    assert [e["status"] for e in logs if e["event"] == "cluster.control_refused"] == [
        413, 400, 400, 400, 400, 411]
    assert len(asked) == 1 and len(asked[0].cause) == endpoint.MAX_CAUSE
    assert raw_request(srv.address, b"GET /other HTTP/1.0\r\n" + auth + b"\r\n").startswith(
        b"HTTP/1.0 404")


def test_the_server_binds_only_its_own_address(server: Any) -> None:
    srv, _ = server
    # 127.0.0.2 reaches the loopback interface too; a wildcard bind would answer there.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", srv.address[1]), timeout=5).close()


def test_a_peer_that_sends_nothing_frees_its_server_thread(monkeypatch: Any) -> None:
    monkeypatch.setattr(endpoint, "REQUEST_TIMEOUT_S", 0.3)
    srv = ControlServer(("127.0.0.1", 0), Token(SECRET), status=dict,
                        on_restart=lambda _r: True).start()
    try:
        with socket.create_connection(srv.address, timeout=10) as s:
            started = time.monotonic()
            assert s.recv(100) == b""  # the server closed it (after its timeout)
            assert time.monotonic() - started < 9
    finally:
        srv.stop()


# -- peers that answer garbage or nothing -----------------------------------------------------


class BadPeer:
    """A listening socket whose connections get `behaviour`: 'silent' (accept, never answer),
    'junk' (a line of junk, then close), 'trickle' (one byte every 50 ms, forever), 'json'
    (an HTTP 200 whose body is not JSON)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)
            if self.behaviour in ("junk", "json"):
                conn.settimeout(1)
                conn.recv(4096)  # take the request first, so that closing sends FIN, not RST
            if self.behaviour == "junk":
                conn.sendall(b"\x00\xffgarbage that is not HTTP\n")
                conn.close()
            elif self.behaviour == "json":
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n<html>hello</html>")
                conn.close()
            elif self.behaviour == "trickle":
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        while not self.stop.wait(0.05):
            try:
                conn.sendall(b"H")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize(("behaviour", "error"), [
    ("silent", "timed out"),
    ("trickle", "timed out"),
    ("junk", "bad reply: no HTTP header"),
    ("json", "bad reply: HTTP 200 with a body that is not JSON"),
])
def test_a_garbage_peer_is_an_error_value_within_the_deadline(behaviour: str,
                                                              error: str) -> None:
    peer = BadPeer(behaviour)
    client = ControlClient(Token(SECRET), connect_timeout=0.5, deadline=0.5)
    try:
        started = time.monotonic()
        for result in (client.status(peer.address),
                       client.ask_restart(peer.address, 1, 1, "x")):
            assert isinstance(result, PeerError) and result.error.startswith(error), result
        # Both calls returned by their deadline (0.5 s each), not by the peer's will: the
        # trickle never ends and the silent peer never answers. The bound is loose on
        # purpose (a loaded machine), but far below anything a hang would take.
        assert time.monotonic() - started < 5
    finally:
        peer.close()


def test_a_closed_port_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    assert ControlClient(Token(SECRET)).status(("127.0.0.1", port)) == PeerError(
        "connection refused")


def test_the_token_never_shows(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_bytes(SECRET + b"\n")
    t = Token.from_file(str(f))
    assert t.matches("Bearer " + SECRET.decode())
    assert not t.matches("Bearer " + SECRET.decode()[:-1]) and not t.matches(None)
    assert not t.matches(SECRET.decode())  # no scheme
    assert SECRET.decode() not in repr(t) and SECRET.decode() not in str(t)
    assert SECRET.decode() not in repr(ControlClient(t))
    with pytest.raises(ValueError):
        Token(b"")
