"""Kubernetes probes, metrics and status over aiohttp. It only reads the daemon's state.

`/readyz` never depends on the store: codi2 is a container in the user's pod, and a store blip must not
take the user's IDE out of service. The store's health is in `/status` and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Checks = Mapping[str, Callable[[], bool]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _probe(name: str, checks: Checks) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        results = {check: fn() for check, fn in checks.items()}
        ok = all(results.values())
        status = 200 if ok else 503
        if "verbose" not in request.query:
            return web.Response(text="ok" if ok else "failed", status=status)
        lines = [f"[{'+' if good else '-'}]{check} {'ok' if good else 'failed'}" for check, good in results.items()]
        lines.append(f"{name} check {'passed' if ok else 'failed'}")
        return web.Response(text="\n".join(lines) + "\n", status=status)

    return handler


def build_app(
    *, live: Checks, ready: Checks, status: Callable[[], dict[str, Any]], registry: CollectorRegistry
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_handler(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(status(), indent=2), content_type="application/json")

    app = web.Application()
    app.router.add_get("/livez", _probe("livez", live))
    app.router.add_get("/healthz", _probe("healthz", live))
    app.router.add_get("/readyz", _probe("readyz", ready))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_handler)
    return app


# A probe or a scrape sends its request at once; a connection that has not finished one this long after it
# opened (or after its last response) is a slow or idle client, and holds a descriptor the journal needs.
HEADER_TIMEOUT_S = 5.0
# Kubelet probes and a Prometheus scrape need a few connections; past this many the oldest idle one goes.
MAX_CONNECTIONS = 32


def connection_cap() -> int:
    """`MAX_CONNECTIONS`, or a sixteenth of the descriptors the process may hold when that is fewer: under a
    low nofile limit 32 connections (and as many again accepted in one burst) took every descriptor the
    watcher, the journal and the store had left."""
    return max(2, min(MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 16))


class _Guard:
    """Bounds the health port's connections, which aiohttp does not: a local process holding hundreds of idle
    or half-sent requests would otherwise take the descriptors the journal, the store and the watcher need.

    Every connection must complete a request within `HEADER_TIMEOUT_S` of opening or of its last response
    (one timer per connection, none when there is none: an idle daemon never wakes), and past
    its cap (`connection_cap`) a new connection evicts the oldest one not inside a handler, so a probe still gets in."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], limit: int, timeout: float) -> None:
        self._inner = inner
        self._limit = limit
        self._timeout = timeout
        self._open: dict[asyncio.BaseTransport, asyncio.TimerHandle | None] = {}  # insertion order = age

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self._inner())

    def opened(self, transport: asyncio.BaseTransport) -> None:
        if len(self._open) >= self._limit:
            idle = next((t for t, timer in self._open.items() if timer is not None), None)
            (idle or transport).close()
            if idle is None:
                return
            self.closed(idle)
        self._open[transport] = None
        self.idle(transport)

    def idle(self, transport: asyncio.BaseTransport) -> None:
        """No request in progress: the client has `timeout` seconds to send the next one."""
        if transport in self._open:
            self.busy(transport)
            loop = asyncio.get_running_loop()
            self._open[transport] = loop.call_later(self._timeout, self._expire, transport)

    def busy(self, transport: asyncio.BaseTransport) -> None:
        timer = self._open.get(transport)
        if timer is not None:
            timer.cancel()
            self._open[transport] = None

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self.busy(transport)
        self._open.pop(transport, None)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self._open[transport] = None
        transport.close()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard told when it opens and closes."""

    def __init__(self, guard: _Guard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)
        self._guard.opened(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class HealthServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._guard: _Guard | None = None

        @web.middleware
        async def in_handler(request: web.Request, handler: Handler) -> web.StreamResponse:
            guard, transport = self._guard, request.transport
            if guard is None or transport is None:
                return await handler(request)
            guard.busy(transport)
            try:
                return await handler(request)
            finally:
                guard.idle(transport)

        app.middlewares.append(in_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=HEADER_TIMEOUT_S)
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        inner = self._runner.server
        assert inner is not None
        cap = connection_cap()
        self._guard = _Guard(inner, cap, HEADER_TIMEOUT_S)
        # The backlog is also how many connections asyncio accepts in one turn, before the guard sees any.
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard, self._host, self._port, backlog=cap)
        self.port = self._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
