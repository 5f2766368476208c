"""Ollama's /api/* on top of vLLM's OpenAI API: the handlers (I/O). The mapping itself is
pure, in ollama_map.py.

Requests go through the same hold queue, retry and in-flight accounting as the passthrough
(proxy.send); errors come in Ollama's dialect: `{"error": "..."}` with the HTTP status before
any output, a final `{"error": "..."}` line after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from nika_supervisor.gate import ollama_map as om
from nika_supervisor.gate.protocol import GateSettings
from nika_supervisor.gate.proxy import (
    RejectedError,
    Upstream,
    bad_gateway,
    reject_response,
    send,
)
from nika_supervisor.log import get_logger

NDJSON = "application/x-ndjson"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Ollama:
    def __init__(self, up: Upstream, settings: Callable[[], GateSettings]) -> None:
        self.up = up
        self.settings = settings
        self.started = om.now_rfc3339()
        self._keep_alive_logged = False
        self._max_len: tuple[int, int | None] = (-1, None)  # (view seq, vLLM's max_model_len)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/chat", self.chat), web.post("/api/generate", self.generate),
                web.get("/api/tags", self.tags), web.post("/api/show", self.show),
                web.get("/api/version", self.version), web.get("/api/ps", self.ps),
                web.post("/api/embed", self.embed), web.post("/api/embeddings", self.embed)]

    # -- listing -----------------------------------------------------------------------------

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": om.OLLAMA_API_VERSION})

    async def tags(self, _request: web.Request) -> web.Response:
        s = self.settings()
        return web.json_response({"models": [
            om.model_entry(a, s.model, self.started, s.max_model_len, False) for a in s.aliases]})

    async def ps(self, _request: web.Request) -> web.Response:
        s = self.settings()
        loaded = self.up.adm.view is not None and self.up.adm.view.ready
        return web.json_response({"models": [
            om.model_entry(a, s.model, self.started, s.max_model_len, True)
            for a in s.aliases] if loaded else []})

    async def show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        s = self.settings()
        alias = om.resolve(body.get("model") or body.get("name"), s.aliases)
        if alias is None:
            return _error(404, f"model '{body.get('model') or body.get('name')}' not found")
        return web.json_response(om.show(alias, s.model, self.started,
                                         await self._max_model_len()))

    # -- generation --------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        s = self.settings()
        name = body.get("model")
        alias = om.resolve(name, s.aliases)
        if alias is None:
            return _error(404, f"model '{name}' not found")
        if "keep_alive" in body and not self._keep_alive_logged:
            self._keep_alive_logged = True
            get_logger().info("gate.keep_alive_ignored", value=str(body["keep_alive"]),
                              note="the model is always resident")
        stream = body.get("stream", True) is not False
        if not (body.get("messages") if chat else body.get("prompt")):
            return await self._load(request, str(name), chat)
        max_len = await self._max_model_len()
        try:
            if chat:
                path, payload = "/v1/chat/completions", om.chat_payload(
                    body, alias, max_len, stream)
            else:
                path, payload = om.generate_payload(body, alias, max_len, stream)
        except om.BadRequest as e:
            return _error(400, str(e))
        tally = om.Tally()
        try:
            async with send(self.up, "POST", path, request.path, self._headers(),
                            json.dumps(payload).encode()) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    self.up.adm.count("served")
                    return _error(resp.status, om.upstream_error_text(resp.status, raw))
                if not stream:
                    answer = await resp.json(content_type=None)
                    self.up.adm.count("served")
                    return web.json_response(om.whole_answer(str(name), chat, answer, tally))
                return await self._stream(request, resp, str(name), chat, tally)
        except RejectedError as e:
            return reject_response(e.rejection, self.up.adm.hold_timeout, ollama=True)
        except aiohttp.ClientError as e:
            return bad_gateway(e, ollama=True)

    async def _stream(self, request: web.Request, resp: aiohttp.ClientResponse, name: str,
                      chat: bool, tally: om.Tally) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": NDJSON})
        await out.prepare(request)
        buf = b""
        while True:
            try:
                data = await resp.content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                self.up.adm.count("broken_streams")
                get_logger().warning("gate.stream_broken", path=request.path, sse=False,
                                     error=f"{type(e).__name__}: {e}")
                await out.write(json.dumps({"error": "the model server failed mid-answer "
                                            f"({type(e).__name__})"}).encode() + b"\n")
                break
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                done = await self._sse_line(out, line.strip(), name, chat, tally)
                if done:
                    buf = b""
        await out.write_eof()
        self.up.adm.count("served")
        return out

    async def _sse_line(self, out: web.StreamResponse, line: bytes, name: str, chat: bool,
                        tally: om.Tally) -> bool:
        if not line.startswith(b"data:"):
            return False
        data = line[5:].strip()
        if data == b"[DONE]":
            calls = om.ollama_tool_calls(list(tally.tool_calls.values()))
            await out.write(om.stream_line(name, chat, "", tally.final(), calls))
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return False
        if isinstance(chunk, dict) and chunk.get("error"):
            await out.write(json.dumps({"error": om.upstream_error_text(
                500, json.dumps(chunk).encode())}).encode() + b"\n")
            return False
        piece = om.chunk_piece(chunk, tally) if isinstance(chunk, dict) else None
        if piece:
            await out.write(om.stream_line(name, chat, piece))
        return False

    async def _load(self, request: web.Request, name: str, chat: bool) -> web.Response:
        """An empty prompt loads the model in Ollama: here, wait until it is ready."""
        adm = self.up.adm
        rej = await adm.wait(adm.deadline())
        if rej is not None:
            return reject_response(rej, adm.hold_timeout, ollama=True)
        obj: dict[str, Any] = {"model": name, "created_at": om.now_rfc3339(), "done": True,
                               "done_reason": "load"}
        if chat:
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        return web.json_response(obj)

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        s = self.settings()
        alias = om.resolve(body.get("model"), s.aliases)
        if alias is None:
            return _error(404, f"model '{body.get('model')}' not found")
        legacy = request.path == "/api/embeddings"
        inputs = body.get("prompt") if legacy else body.get("input")
        payload = {"model": alias, "input": inputs}
        try:
            async with send(self.up, "POST", "/v1/embeddings", request.path, self._headers(),
                            json.dumps(payload).encode()) as resp:
                raw = await resp.read()
                self.up.adm.count("served")
                if resp.status in (404, 405) or (resp.status == 400 and b"embed" in raw):
                    return _error(501, "this model does not serve embeddings "
                                  f"(vLLM answered {resp.status}: "
                                  f"{om.upstream_error_text(resp.status, raw)})")
                if resp.status != 200:
                    return _error(resp.status, om.upstream_error_text(resp.status, raw))
                vectors = [d["embedding"] for d in json.loads(raw).get("data", [])]
        except RejectedError as e:
            return reject_response(e.rejection, self.up.adm.hold_timeout, ollama=True)
        except aiohttp.ClientError as e:
            return bad_gateway(e, ollama=True)
        if legacy:
            return web.json_response({"embedding": vectors[0] if vectors else []})
        return web.json_response({"model": body.get("model"), "embeddings": vectors})

    # -- plumbing ----------------------------------------------------------------------------

    async def _max_model_len(self) -> int | None:
        """vllm.args max-model-len, else what vLLM reports in /v1/models (asked once per
        upstream view, and only while it is admitted)."""
        configured = self.settings().max_model_len
        adm = self.up.adm
        if configured is not None or not adm.admitted():
            return configured
        if self._max_len[0] != adm.seq:
            found = None
            try:
                async with self.up.session.get(self.up.url("/v1/models"),
                                               headers=self._headers()) as r:
                    data = await r.json(content_type=None)
                for m in data.get("data", []):
                    if m.get("id") in self.settings().aliases:
                        found = m.get("max_model_len")
            except (aiohttp.ClientError, ValueError, AttributeError):
                found = None
            self._max_len = (adm.seq, found if isinstance(found, int) else None)
        return self._max_len[1]

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.up.api_key:
            h["Authorization"] = f"Bearer {self.up.api_key}"
        return h

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        return body
