"""The control endpoint between the supervisors of a group (issue 12), and its client.

Server: a small HTTP server on this node's own `cluster.peers` entry (never a wildcard), on
threads of its own:
- `GET /cluster/status`: this node's view of the group (group.group_status plus what the
  daemon adds: pid, model, vLLM version), as JSON;
- `POST /cluster/restart` with `{"epoch": E, "rank": R, "cause": "..."}`: "restart the group",
  handed to the daemon's callback, which feeds it to the group policy as RestartAsked.
Every request carries `Authorization: Bearer <token>`; a missing or wrong token is answered
401 and logged as `cluster.control_refused` with the peer's address and never the token.
Bodies are limited to MAX_BODY bytes, a slow peer to REQUEST_TIMEOUT_S per socket operation.

Client: one request per connection, with a connect deadline and an overall deadline for the
answer; it returns a value (Reply or PeerError), never raises and never waits past the
deadline, whatever the peer sends (nothing, junk, an endless trickle).
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nika_supervisor.cluster.token import Token
from nika_supervisor.log import get_logger

MAX_BODY = 4096  # a restart request is tens of bytes
MAX_REPLY = 64 * 1024  # a status of a few ranks is well under this
REQUEST_TIMEOUT_S = 5.0  # server side: per socket operation of one request
MAX_CAUSE = 200


@dataclass(frozen=True, slots=True)
class RestartRequest:
    peer: str  # host:port the request came from
    epoch: int
    rank: int
    cause: str


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PeerError:
    error: str  # "timed out", "connection refused", "bad reply: ...", "401 refused"


class ControlServer:
    """Serve the control endpoint on `address` (this node's peers[] entry)."""

    def __init__(self, address: tuple[str, int], token: Token,
                 status: Callable[[], dict[str, Any]],
                 on_restart: Callable[[RestartRequest], bool]) -> None:
        self.token = token
        self.status = status
        self.on_restart = on_restart
        self.log = get_logger()
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("Server", (http.server.ThreadingHTTPServer,),
                          {"address_family": family, "daemon_threads": True})
        self._httpd = server_cls((host, port), self._handler())
        self.address = (host, int(self._httpd.server_address[1]))
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="cluster-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _refuse(self, h: http.server.BaseHTTPRequestHandler, code: int, reason: str) -> None:
        peer = f"{h.client_address[0]}:{h.client_address[1]}"
        self.log.warning("cluster.control_refused", peer=peer, path=h.path.split("?")[0][:100],
                         status=code, reason=reason)
        _send(h, code, {"error": reason})

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S  # a peer that sends nothing frees its thread
            protocol_version = "HTTP/1.0"

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization")
                if server.token.matches(auth):
                    return True
                server._refuse(self, 401, "missing token" if not auth else "bad token")
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path.split("?")[0] != "/cluster/status":
                    _send(self, 404, {"error": "not found"})
                    return
                _send(self, 200, server.status())

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                if self.path.split("?")[0] != "/cluster/restart":
                    _send(self, 404, {"error": "not found"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    server._refuse(self, 411, "no Content-Length")
                    return
                if not 0 <= length <= MAX_BODY:
                    server._refuse(self, 413, f"body over {MAX_BODY} bytes")
                    return
                try:
                    req = _restart_request(self.rfile.read(length), self.client_address)
                except (ValueError, OSError) as e:
                    server._refuse(self, 400, f"bad request: {str(e)[:100]}")
                    return
                _send(self, 200, {"accepted": bool(server.on_restart(req))})

            def log_message(self, format: str, *args: object) -> None:
                pass  # refusals are logged as events; polls every few seconds are not

        return Handler


def _restart_request(raw: bytes, client: tuple[Any, ...]) -> RestartRequest:
    body = json.loads(raw.decode("utf-8"))
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    epoch, rank, cause = body.get("epoch"), body.get("rank"), body.get("cause", "")
    for name, v in (("epoch", epoch), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0")
    if not isinstance(cause, str):
        raise ValueError("cause must be a string")
    return RestartRequest(f"{client[0]}:{client[1]}", epoch, rank, cause[:MAX_CAUSE])  # type: ignore[arg-type]


def _send(h: http.server.BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


# -- the client -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlClient:
    token: Token
    connect_timeout: float = 2.0
    deadline: float = 5.0  # the whole request, connect included

    def status(self, address: tuple[str, int]) -> Reply | PeerError:
        return self._request(address, "GET", "/cluster/status", None)

    def ask_restart(self, address: tuple[str, int], epoch: int, rank: int,
                    cause: str) -> Reply | PeerError:
        body = json.dumps({"epoch": epoch, "rank": rank, "cause": cause[:MAX_CAUSE]}).encode()
        return self._request(address, "POST", "/cluster/restart", body)

    def _request(self, address: tuple[str, int], method: str, path: str,
                 body: bytes | None) -> Reply | PeerError:
        end = time.monotonic() + self.deadline
        host, port = address
        head = (f"{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
                f"Authorization: {self.token.header()}\r\n"
                f"Content-Length: {len(body or b'')}\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n\r\n").encode("latin-1")
        try:
            with socket.create_connection(address, timeout=min(self.connect_timeout,
                                                                self.deadline)) as sock:
                _sendall(sock, head + (body or b""), end)
                raw = _read_all(sock, end)
        except TimeoutError:
            return PeerError("timed out")
        except ConnectionRefusedError:
            return PeerError("connection refused")
        except OSError as e:
            return PeerError(f"network error: {e.strerror or e.__class__.__name__}")
        return _parse_reply(raw)


def _remaining(end: float) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _sendall(sock: socket.socket, data: bytes, end: float) -> None:
    view = memoryview(data)
    while view:
        sock.settimeout(_remaining(end))
        sent = sock.send(view)
        view = view[sent:]


def _read_all(sock: socket.socket, end: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        sock.settimeout(_remaining(end))
        try:
            chunk = sock.recv(16384)
        except ConnectionResetError:
            if not chunks:
                raise
            chunk = b""  # a peer that answered and then reset: judge what it sent
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            return b"".join(chunks)[:MAX_REPLY]  # _parse_reply finds it incomplete


def _parse_reply(raw: bytes) -> Reply | PeerError:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return PeerError(f"bad reply: no HTTP header ({len(raw)} bytes)")
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return PeerError("bad reply: not an HTTP status line")
    status = int(parts[1])
    if status == 401:
        return PeerError("401 refused: the peer does not accept this node's token")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return PeerError(f"bad reply: HTTP {status} with a body that is not JSON")
    if not isinstance(data, dict):
        return PeerError(f"bad reply: HTTP {status} with JSON that is not an object")
    return Reply(status, data)
