"""Kubernetes probes, metrics and status over aiohttp. It only reads the daemon's state.

`/readyz` never depends on the store: codi2 is a container in the user's pod, and a store blip must not
take the user's IDE out of service. The store's health is in `/status` and the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Checks = Mapping[str, Callable[[], bool]]


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


class HealthServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._host = host
        self._port = port
        self.port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the real port when 0 was asked for

    async def stop(self) -> None:
        await self._runner.cleanup()
