"""The stand-in's HTTP side: the OpenAI-style routes, /health, /metrics and the
/_standin/ control endpoints, over the state a test can steer. (See standin_server.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standin_common import env_flag, env_float, write_all

VERSION = "0.32.0+standin"


# --------------------------------------------------------------------------- server state


class Control:
    """What the HTTP handlers read; mutated by env timers and POST /_standin/engine."""

    def __init__(self, names: list[str], model: str) -> None:
        self.lock = threading.Lock()
        self.names = names
        self.model = model
        self.bound_mono: float | None = None
        self.list_delay = env_float("STANDIN_LIST_DELAY_S", 0.0) or 0.0
        self.health_503_after = env_float("STANDIN_HEALTH_503_AFTER_S")
        self.models_delay = env_float("STANDIN_MODELS_DELAY_S", 0.0) or 0.0
        self.health_delay = env_float("STANDIN_HEALTH_DELAY_S", 0.0) or 0.0
        self.chunk_delay = 0.0  # default spacing of streamed chunks
        self.progress_rate = env_float("STANDIN_PROGRESS_RATE", 50.0) or 0.0
        self.frozen = False
        self.dead = False
        self.listed = True
        self.progress_since: float | None = None
        self.tokens_base = 0.0
        self.running = 0
        self.waiting = 0
        self.counts: dict[str, int] = {}
        self.first_listed_mono: float | None = None
        self.unfrozen = threading.Event()
        self.unfrozen.set()
        key = os.environ.get("VLLM_API_KEY", "")
        self.api_key = key if (key and env_flag("STANDIN_REQUIRE_KEY")) else None
        self.exit_request: int | None = None
        self.exit_event = threading.Event()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def lists(self, now: float) -> bool:
        return (self.listed and self.bound_mono is not None
                and now >= self.bound_mono + self.list_delay)

    def engine_dead(self, now: float) -> bool:
        if self.dead:
            return True
        return (self.health_503_after is not None and self.bound_mono is not None
                and now >= self.bound_mono + self.health_503_after)

    def tokens(self, now: float) -> float:
        with self.lock:
            extra = 0.0
            if self.progress_since is not None and not self.frozen:
                extra = (now - self.progress_since) * self.progress_rate
            return self.tokens_base + extra

    def apply(self, body: dict[str, Any], now: float) -> None:
        with self.lock:
            if "progress" in body:
                if body["progress"] and self.progress_since is None:
                    self.progress_since = now
                elif not body["progress"] and self.progress_since is not None:
                    self.tokens_base += (now - self.progress_since) * self.progress_rate
                    self.progress_since = None
            if "frozen" in body:
                if body["frozen"] and not self.frozen and self.progress_since is not None:
                    # freeze the counter where it is
                    self.tokens_base += (now - self.progress_since) * self.progress_rate
                    self.progress_since = now
                elif not body["frozen"] and self.frozen and self.progress_since is not None:
                    self.progress_since = now
                self.frozen = bool(body["frozen"])
                (self.unfrozen.clear if self.frozen else self.unfrozen.set)()
            if "running" in body:
                self.running = int(body["running"])
            if "waiting" in body:
                self.waiting = int(body["waiting"])
            if "dead" in body:
                self.dead = bool(body["dead"])
            if "listed" in body:
                self.listed = bool(body["listed"])
            if "models_delay_s" in body:
                self.models_delay = float(body["models_delay_s"])
            if "health_delay_s" in body:
                self.health_delay = float(body["health_delay_s"])
            if "chunk_delay_s" in body:
                self.chunk_delay = float(body["chunk_delay_s"])
            if "exit" in body:
                self.exit_request = int(body["exit"])  # the handler sets exit_event once
                # its answer is written: exiting first cut the answer short (IncompleteRead)

    def snapshot(self, now: float) -> dict[str, Any]:
        tokens = self.tokens(now)
        with self.lock:
            return {"pid": os.getpid(), "frozen": self.frozen, "dead": self.engine_dead(now),
                    "listed": self.listed, "lists": self.lists(now), "running": self.running,
                    "waiting": self.waiting, "generation_tokens_total": tokens,
                    "progress": self.progress_since is not None,
                    "models_delay_s": self.models_delay, "health_delay_s": self.health_delay,
                    "counts": dict(self.counts), "bound_mono": self.bound_mono,
                    "first_listed_mono": self.first_listed_mono}


def metrics_text(c: Control, now: float) -> str:
    """The few vLLM metrics the supervisor reads, in vLLM's names and label style
    (vllm/v1/metrics/loggers.py: `vllm:num_requests_running` etc., label model_name)."""
    label = f'model_name="{c.names[0]}"'
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{engine=\"0\",{label}}} {float(c.running)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{engine=\"0\",{label}}} {float(c.waiting)}\n"
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{{engine=\"0\",{label}}} {float(int(c.tokens(now)))}\n"
    )


class Handler(BaseHTTPRequestHandler):
    server_version = "uvicorn"
    sys_version = ""
    control: Control  # set on the subclass made per server

    # -- plumbing ------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _access(self, code: int) -> None:
        if env_flag("STANDIN_ACCESS_LOG"):
            host, port = self.client_address[:2]
            line = f'(APIServer pid={os.getpid()}) INFO:     {host}:{port} - "{self.command} ' \
                   f'{self.path} HTTP/1.1" {code}\n'
            with contextlib.suppress(OSError):
                write_all(sys.stdout.fileno(), line.encode())

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        try:
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self._access(code)

    def _json(self, code: int, data: Any) -> None:
        self._send(code, json.dumps(data).encode())

    def _authorized(self) -> bool:
        key = self.control.api_key
        if key is None or not self.path.startswith("/v1"):
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._json(401, {"error": "Unauthorized"})
        return False

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _stream(self, path: str, body: dict[str, Any]) -> None:
        """SSE as vLLM sends it: one `data:` event per token, then a usage chunk when asked
        (stream_options.include_usage), then `data: [DONE]`. Tokens are "tok0", "tok1", ...;
        `max_tokens` of them (default 3), `standin_chunk_delay_s` apart."""
        n = int(body.get("max_tokens") or 3)
        gap = float(body.get("standin_chunk_delay_s") or self.control.chunk_delay)
        chat = path == "/v1/chat/completions"
        rid, created = f"standin-{time.monotonic_ns()}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(data: Any) -> bytes:
            return chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        try:
            # chunked, as uvicorn sends it: a server that dies mid-stream leaves the last
            # chunk missing, which a client can tell from a complete answer
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            for i in range(n):
                piece = f"tok{i} "
                choice: dict[str, Any] = (
                    {"index": 0, "delta": {"role": "assistant", "content": piece}
                     if i == 0 else {"content": piece}, "finish_reason": None} if chat
                    else {"index": 0, "text": piece, "finish_reason": None})
                if i == n - 1:
                    choice["finish_reason"] = "length"
                self.wfile.write(event({"id": rid, "object": obj, "created": created,
                                        "model": body["model"], "choices": [choice],
                                        "standin_sent_mono": time.monotonic()}))
                self.wfile.flush()
                if gap and i < n - 1:
                    time.sleep(gap)
            if (body.get("stream_options") or {}).get("include_usage"):
                self.wfile.write(event({"id": rid, "object": obj, "created": created,
                                        "model": body["model"], "choices": [],
                                        "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                                  "total_tokens": n + 1}}))
            self.wfile.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.control.count("stream aborted by client")
        self._access(200)

    # -- routes --------------------------------------------------------------------------

    def do_GET(self) -> None:
        c, path = self.control, self.path.split("?", 1)[0]
        c.count(f"GET {path}")
        if not self._authorized():
            return
        if path == "/health":
            if c.health_delay:
                time.sleep(c.health_delay)
            if c.engine_dead(time.monotonic()):
                self._send(503, b"")
            else:
                self._send(200, b"")
        elif path == "/v1/models":
            if c.models_delay:
                time.sleep(c.models_delay)
            now = time.monotonic()
            data: list[dict[str, Any]] = []
            if c.lists(now):
                if c.first_listed_mono is None:
                    c.first_listed_mono = now
                created = int(time.time())
                data = [{"id": n, "object": "model", "created": created, "owned_by": "vllm",
                         "root": c.model, "parent": None, "max_model_len": 8192,
                         "permission": []} for n in c.names]
            self._json(200, {"object": "list", "data": data})
        elif path == "/metrics":
            self._send(200, metrics_text(c, time.monotonic()).encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/version":
            self._json(200, {"version": VERSION})
        elif path == "/_standin/state":
            self._json(200, c.snapshot(time.monotonic()))
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        c, path = self.control, self.path.split("?", 1)[0]
        c.count(f"POST {path}")
        body = self._body()
        if path == "/_standin/engine":
            c.apply(body, time.monotonic())
            self._json(200, c.snapshot(time.monotonic()))
            if c.exit_request is not None:
                self.wfile.flush()
                c.exit_event.set()
            return
        if not self._authorized():
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._json(404, {"detail": "Not Found"})
            return
        if body.get("model") not in c.names:
            self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not "
                                       "exist.", "type": "NotFoundError", "code": 404}})
            return
        c.unfrozen.wait()  # a frozen engine: the request never completes
        if c.engine_dead(time.monotonic()):
            self._json(500, {"error": {"message": "EngineCore encountered an issue. See stack "
                                       "trace (above) for the root cause.",
                                       "type": "InternalServerError", "code": 500}})
            return
        with c.lock:
            c.tokens_base += 1
        delay = float(body.get("standin_delay_s") or 0)
        if delay:  # a slow answer (drain tests): nothing is sent until it is done
            time.sleep(delay)
        if body.get("stream"):
            self._stream(path, body)
            return
        created, usage = int(time.time()), {"prompt_tokens": 1, "completion_tokens": 1,
                                             "total_tokens": 2}
        if path == "/v1/completions":
            self._json(200, {"id": f"cmpl-standin-{time.monotonic_ns()}",
                             "object": "text_completion", "created": created,
                             "model": body["model"],
                             "choices": [{"index": 0, "text": " pong", "logprobs": None,
                                          "finish_reason": "length"}], "usage": usage})
        else:
            self._json(200, {"id": f"chatcmpl-standin-{time.monotonic_ns()}",
                             "object": "chat.completion", "created": created,
                             "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": "pong"},
                                          "finish_reason": "length"}], "usage": usage})


# ------------------------------------------------------------------------------ binding


def open_server(host: str, port: int, handler: type[Handler],
                publish: Callable[[ThreadingHTTPServer], None]) -> ThreadingHTTPServer:
    """Bind, call publish(server), and only then listen. Whoever can connect must find the
    bind already recorded (bound_mono, bound_at): listening first raced a test that read
    api.json as soon as the port accepted. Raises OSError when the bind fails."""
    server = ThreadingHTTPServer((host, port), handler, bind_and_activate=False)
    # socketserver's default backlog of 5 drops SYNs under 64 concurrent clients (1 s
    # retransmits, bench/gate_bench.py); uvicorn's default is 2048
    server.request_queue_size = 1024
    try:
        server.server_bind()
        publish(server)
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    server.daemon_threads = True
    return server
