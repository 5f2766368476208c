"""Passthrough: any request forwarded to vLLM unchanged, the answer streamed back as it comes.

- The body is read whole first (it is kept for the one retry).
- A request that vLLM failed before sending any byte (refused, reset: it died under the
  request) goes back through the hold queue once, within the same deadline (nginx's rule:
  retry only what reached no one).
- Once the answer has started, a break is never silent: an SSE stream ends with an error
  event, anything else with a cut connection (its length or chunking then shows it short).
- A client that goes away cancels the handler (aiohttp handler_cancellation), which closes
  the upstream connection, so vLLM aborts the request and frees its slot.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from nika_supervisor.gate.hold import Admission, Rejection, ollama_error, openai_error
from nika_supervisor.log import get_logger

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
                        "content-length"})
# Failures that mean vLLM never answered: nothing reached the client, safe to send again.
NOT_ANSWERED = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError, aiohttp.ServerTimeoutError)


class UpstreamBroken(Exception):
    """vLLM cut an answer that had already started."""


@dataclass
class Upstream:
    """The client side towards vLLM: one pooled session, the address from the latest view."""

    session: aiohttp.ClientSession
    adm: Admission
    api_key: str | None = None

    def url(self, path_qs: str) -> str:
        assert self.adm.view is not None
        return f"http://{reachable(self.adm.view.upstream)}{path_qs}"


def reachable(upstream: str) -> str:
    """"HOST:PORT" as published (vllm.host may be a wildcard or a bare IPv6 address) -> the
    authority to connect to: a wildcard is loopback, IPv6 goes in brackets."""
    host, _, port = upstream.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_session() -> aiohttp.ClientSession:
    # keepalive below uvicorn's 5 s, so a pooled connection is never one vLLM just closed;
    # no total timeout: a long generation is not a fault (the daemon's probes judge vLLM).
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                                 skip_auto_headers=("User-Agent", "Accept-Encoding"))


def forward_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones; repeated headers stay repeated."""
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


REJECT_LOG_EVERY_S = 1.0
_reject_log: dict[str, tuple[float, int]] = {}  # reason -> (last logged, suppressed since)


def reject_response(rej: Rejection, hold_timeout: float, ollama: bool) -> web.Response:
    body = ollama_error(rej, hold_timeout) if ollama else openai_error(rej, hold_timeout)
    # One line per reason per second at most: a max_held overflow can be thousands a second;
    # the next line says how many were not logged (the count is in the stats either way).
    now = time.monotonic()
    last, suppressed = _reject_log.get(rej.reason, (-REJECT_LOG_EVERY_S, 0))
    if now - last >= REJECT_LOG_EVERY_S:
        get_logger().info("gate.rejected", reason=rej.reason, phase=rej.phase, cause=rej.cause,
                          held_s=round(rej.held_s, 3), retry_after=rej.retry_after,
                          suppressed=suppressed or None)
        _reject_log[rej.reason] = (now, 0)
    else:
        _reject_log[rej.reason] = (last, suppressed + 1)
    return web.json_response(body, status=503, headers={"Retry-After": str(rej.retry_after)})


async def passthrough(request: web.Request, up: Upstream) -> web.StreamResponse:
    body = await request.read()
    headers = forward_headers(request.headers)
    try:
        async with send(up, request.method, request.path_qs, request.path, headers,
                        body or None) as resp:
            return await _relay(request, resp, up.adm)
    except RejectedError as e:
        return reject_response(e.rejection, up.adm.hold_timeout, ollama=False)
    except aiohttp.ClientError as e:  # vLLM answered, but not in HTTP we can relay
        return bad_gateway(e, ollama=False)


def bad_gateway(e: Exception, ollama: bool) -> web.Response:
    message = f"the model server sent an answer the gate cannot relay ({type(e).__name__}: {e})"
    get_logger().warning("gate.bad_gateway", error=f"{type(e).__name__}: {e}")
    body: dict[str, object] = {"error": message} if ollama else {"error": {
        "message": message, "type": "bad_gateway", "param": None, "code": 502}}
    return web.json_response(body, status=502)


@contextlib.asynccontextmanager
async def send(up: Upstream, method: str, path_qs: str, path: str,
               headers: Mapping[str, str] | list[tuple[str, str]],
               body: bytes | None) -> AsyncIterator[aiohttp.ClientResponse]:
    """Hold until admitted, send, retry once what vLLM failed before answering; yield the
    response once its headers are in (counted in flight until the body is done), or raise
    RejectedError."""
    adm = up.adm
    start = adm.clock()
    deadline = start + adm.hold_timeout
    after_seq: int | None = None
    failure = ""
    for attempt in (0, 1):
        rej = await adm.wait(deadline, after_seq)
        if rej is not None:
            raise RejectedError(rej)
        with adm.forwarding():
            try:
                resp = await up.session.request(method, up.url(path_qs), headers=headers,
                                                data=body, allow_redirects=False)
            except NOT_ANSWERED as e:
                failure = f"{type(e).__name__}: {e}"
                after_seq = adm.seq
                if attempt == 0:
                    adm.count("retried")
                    get_logger().info("gate.retrying", method=method, path=path,
                                      error=failure)
                continue
            try:
                yield resp
            finally:
                resp.release() if resp.content.at_eof() else resp.close()
            return
    raise RejectedError(adm.reject_failed(start, failure))


async def _relay(request: web.Request, resp: aiohttp.ClientResponse,
                 adm: Admission) -> web.StreamResponse:
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    for k, v in resp.headers.items():
        if k.lower() not in HOP_BY_HOP:
            out.headers.add(k, v)
    sse = resp.headers.get("content-type", "").startswith("text/event-stream")
    if sse:
        out.headers["X-Accel-Buffering"] = "no"
    if resp.content_length is not None and not sse:
        out.content_length = resp.content_length
    await out.prepare(request)
    while True:
        try:
            chunk = await resp.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            adm.count("broken_streams")
            get_logger().warning("gate.stream_broken", path=request.path, sse=sse,
                                 error=f"{type(e).__name__}: {e}")
            if sse:
                await out.write(sse_error("the model server failed mid-answer "
                                          f"({type(e).__name__})"))
                await out.write_eof()
            elif request.transport is not None:
                # the client must see a short body, never a complete-looking one
                request.transport.abort()
            adm.count("served")
            return out
        if not chunk:
            break
        await out.write(chunk)  # a client gone raises here: the handler ends, upstream closes
    await out.write_eof()
    adm.count("served")
    return out


def sse_error(message: str) -> bytes:
    """An OpenAI-style error as an SSE event: the openai SDK raises APIError on it."""
    err = {"error": {"message": message, "type": "upstream_error", "param": None, "code": 502}}
    return b"data: " + json.dumps(err).encode() + b"\n\n"


class RejectedError(Exception):
    def __init__(self, rej: Rejection) -> None:
        super().__init__(rej.reason)
        self.rejection = rej
