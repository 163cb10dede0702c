"""The app factory: `create_app(settings)` wires routes, state and a lifespan opening and closing clients."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pilotfleet_proxy.auth import TokenAuthority
from pilotfleet_proxy.errors import install_error_handlers
from pilotfleet_proxy.fleet import Fleet
from pilotfleet_proxy.metrics import ProxyMetrics
from pilotfleet_proxy.routers import completions, copilot, health, models
from pilotfleet_proxy.routes import RouteTable, RouteWatcher
from pilotfleet_proxy.settings import ProxySettings
from pilotfleet_proxy.state import ProxyState

log = logging.getLogger(__name__)


def create_app(settings: ProxySettings) -> FastAPI:
    """Build the proxy app; it loads the route table and starts watching it when the app starts."""
    fleet = Fleet(settings)
    metrics = ProxyMetrics(outstanding=lambda: [(e.url, e.outstanding) for e in fleet.endpoints.all()])
    secret = settings.auth_token.get_secret_value() if settings.auth_token else None
    state = ProxyState(
        settings=settings, fleet=fleet, metrics=metrics, auth=TokenAuthority(secret, settings.token_ttl_s)
    )

    async def apply(table: RouteTable) -> None:
        await fleet.apply(table)
        metrics.route_reloads.labels("applied").inc()

    def rejected(_exc: Exception) -> None:
        metrics.route_reloads.labels("invalid").inc()

    watcher = RouteWatcher(settings.routes_file, settings.routes_poll_s, on_change=apply, on_error=rejected)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await watcher.start()
        log.info("proxy watching route table %s", settings.routes_file)
        try:
            yield
        finally:
            await watcher.stop()
            await fleet.close()

    app = FastAPI(title="pilotfleet proxy", lifespan=lifespan)
    app.state.pilotfleet = state
    install_error_handlers(app)
    app.add_middleware(copilot.GitHubRequestIdMiddleware)
    for module in (completions, models, copilot, health):
        app.include_router(module.router)
    return app


def app_from_env() -> FastAPI:
    """The app with settings from the environment: `uvicorn --factory pilotfleet_proxy.app:app_from_env`."""
    return create_app(ProxySettings())
