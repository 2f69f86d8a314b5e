"""A small real HTTP service whose endpoints misbehave on demand, for the http probe and sweep tests.

Routes under ``/svc/``: ``ok`` (200, with a cookie and a secret-looking header
the probe must never echo), ``fail`` (503), ``slow`` (200 after ``slow_s``),
``hang`` (never answers until the server stops), ``redirect`` (302 → ``ok``),
``away`` (302 to a host outside any allowed target), ``loop`` (302 to itself),
``big`` (a body far larger than the probe keeps), ``missing`` (404) and
``metrics`` (Prometheus text format, so a real Prometheus can scrape it).
``/admin`` lies outside ``/svc/`` on the same port.
Plain Python (no pytest), so benchmarks and scenarios can reuse it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

SECRET_HEADER_VALUE = "Bearer leaked-by-headers-0123456789"


class FlakyService:
    """A real aiohttp server on a free loopback port; ``hits`` counts requests per route."""

    def __init__(self, *, slow_s: float = 0.3) -> None:
        self.slow_s = slow_s
        self.port = 0
        self.hits: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        """host:port, as Prometheus labels it (``instance``)."""
        return f"127.0.0.1:{self.port}"

    def url(self, route: str) -> str:
        return f"{self.base}/svc/{route}"

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        route = request.match_info["route"]
        if route == "ok":
            resp = web.Response(text="all good: 3 orders pending", headers={"X-Upstream-Token": SECRET_HEADER_VALUE})
            resp.set_cookie("session", "cookie-secret-value")
            return resp
        if route == "fail":
            return web.Response(status=503, text="upstream database unavailable")
        if route == "slow":
            await asyncio.sleep(self.slow_s)  # the behaviour under test: an endpoint that is slow
            return web.Response(text="finally")
        if route == "hang":
            await self._stopping.wait()
            return web.Response(text="too late")
        if route == "redirect":
            raise web.HTTPFound(location="/svc/ok")
        if route == "away":
            raise web.HTTPFound(location="http://internal-admin.invalid/secrets")
        if route == "loop":
            raise web.HTTPFound(location="/svc/loop")
        if route == "big":
            return web.Response(body=b"x" * (2 * 1024 * 1024))
        if route == "metrics":
            return web.Response(text="service_requests_total 7\n", content_type="text/plain")
        return web.Response(status=404, text="no such route")

    async def _admin(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(text="admin console")

    async def __aenter__(self) -> FlakyService:
        app = web.Application()
        app.router.add_get("/svc/{route}", self._handle)
        app.router.add_get("/admin", self._admin)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
