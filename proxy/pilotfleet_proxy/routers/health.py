"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from pilotfleet_proxy.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """Liveness: the process answers HTTP."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Readiness: a route table is loaded and at least one of its models has a ready Triton endpoint.

    One model down must not take every proxy replica out of its Service, so all models need not be ready;
    the body says which are.
    """
    served = state.fleet.models()
    readiness = await asyncio.gather(*(s.backend.ready() for s in served))
    models = {s.route.name: ok for s, ok in zip(served, readiness, strict=True)}
    ready = state.fleet.loaded and any(readiness)
    body = {
        "status": "ready" if ready else "not ready",
        "routes_loaded": state.fleet.loaded,
        "models": models,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus exposition of this proxy's metrics."""
    data, content_type = state.metrics.render()
    return Response(data, media_type=content_type)
