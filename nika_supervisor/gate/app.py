"""The gate's HTTP application: the key check, Ollama's /api/*, and everything else passed
through to vLLM."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import ClientError, ClientTimeout, web

from nika_supervisor.gate.hold import Admission
from nika_supervisor.gate.ollama import Ollama
from nika_supervisor.gate.protocol import GateSettings
from nika_supervisor.gate.proxy import Upstream, new_session, passthrough, reject_response

# Routes that reach no model: open without the key, from loopback peers only.
OPEN_ON_LOOPBACK = frozenset({"/health", "/metrics", "/ping", "/version", "/api/version"})
# Routes that never wait: a monitor asking for /health while vLLM is down gets 503 at once.
NO_HOLD = frozenset({"/health", "/metrics", "/ping"})
CLIENT_MAX_SIZE = 64 * 1024 * 1024  # images in base64 make big bodies


def read_key(path: str | None) -> str | None:
    """The API key, from its file (vllm.api_key_file), as the daemon reads it; never logged."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


class GateApp:
    def __init__(self, settings: GateSettings, adm: Admission) -> None:
        self.settings = settings
        self.adm = adm
        self.key = read_key(settings.api_key_file)
        self.up = Upstream(new_session(), adm, self.key)
        self.ollama = Ollama(self.up, lambda: self.settings)

    def update(self, settings: GateSettings) -> None:
        """A reload: new limits and a re-read key; the listening sockets stay."""
        self.settings = settings
        self.adm.hold_timeout = settings.hold_timeout
        self.adm.max_held = settings.max_held
        self.key = self.up.api_key = read_key(settings.api_key_file)

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=CLIENT_MAX_SIZE)
        app.router.add_routes([web.route(r.method, r.path, self._if_ollama(r.handler))
                               for r in self.ollama.routes()])
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/metrics" and self.settings.metrics_url:
            return await self.metrics()
        if request.path in NO_HOLD and not self.adm.admitted():
            return reject_response(self.adm.reject_now(), self.adm.hold_timeout, ollama=False)
        return await passthrough(request, self.up)

    async def metrics(self) -> web.StreamResponse:
        """The daemon's scrape target (nika_* always, vLLM's own when it answers)."""
        url = self.settings.metrics_url
        assert url is not None
        try:
            async with self.up.session.get(url, timeout=ClientTimeout(total=5)) as r:
                body = await r.read()
                return web.Response(body=body, status=r.status,
                                    headers={"Content-Type": r.headers.get(
                                        "Content-Type", "text/plain; version=0.0.4")})
        except (ClientError, TimeoutError) as e:
            return web.Response(status=503, text=f"the supervisor's metrics are not "
                                f"answering: {type(e).__name__}\n")

    def _if_ollama(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def h(request: web.Request) -> web.StreamResponse:
            if not self.settings.ollama:
                return await self.forward(request)
            return await handler(request)
        return h

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if self.key is None:
            return await handler(request)
        if request.path in OPEN_ON_LOOPBACK and _loopback(request.transport and
                                                          request.transport.get_extra_info(
                                                              "peername")):
            return await handler(request)
        got = request.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), f"Bearer {self.key}".encode()):
            return await handler(request)
        if request.path.startswith("/api/"):
            return web.json_response({"error": "unauthorized: send Authorization: Bearer "
                                      "<key>"}, status=401)
        return web.json_response({"error": {"message": "Unauthorized: a valid API key is "
                                            "required (Authorization: Bearer <key>)",
                                            "type": "invalid_request_error", "param": None,
                                            "code": 401}}, status=401)

    async def _close(self, _app: web.Application) -> None:
        await self.up.session.close()
