"""The GitHub side of Copilot, answered by the proxy itself, so editors never need github.com.

A Copilot client signs in against a "GitHub API" URL: it swaps its GitHub token for a Copilot token at
`/copilot_internal/v2/token`, reads `/copilot_internal/user`, and then takes every other URL from the
token's `endpoints`. Ours all point back at this proxy, so an editor needs nothing but the sign-in URL:
completions come to `{proxy}/v1/engines/{engine}/completions`, model choices from `{proxy}/models`, the
experiment config from `{proxy}/telemetry`. Clients refuse any response, even a 404, that lacks an
`X-GitHub-Request-Id` header; `GitHubRequestIdMiddleware` puts one on every response.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pilotfleet_proxy.protocol import CopilotUser, ExperimentConfig
from pilotfleet_proxy.state import State

log = logging.getLogger(__name__)

router = APIRouter(tags=["copilot"])

REQUEST_ID_HEADER = "X-GitHub-Request-Id"
# Keys of the token's `endpoints`: `api` (GitHub API, e.g. /models), `proxy` (completions), `telemetry`
# (experiment config and usage events) and `origin-tracker` (code referencing).
ENDPOINT_KEYS = ("api", "proxy", "telemetry", "origin-tracker")
# The user name the sign-in reports: the proxy knows teams by their shared token, not people.
USER_LOGIN = "pilotfleet"


def public_url(request: Request, state: State) -> str:
    """The URL editors reach this proxy at: the `public_url` setting, else the request's own base URL.

    Behind an Ingress the Host header is the external one, but TLS usually ends at the Ingress, so the
    scheme the proxy sees is http: set `public_url` there.
    """
    configured = state.settings.public_url
    return (configured or str(request.base_url)).rstrip("/")


@router.get("/copilot_internal/v2/token")
async def copilot_token(request: Request, state: State) -> Response:
    """Swap the client's sign-in token for a Copilot token whose `endpoints` all point at this proxy."""
    state.auth.check_exchange(request.headers.get("authorization"))
    base = public_url(request, state)
    token = state.auth.issue().model_copy(update={"endpoints": dict.fromkeys(ENDPOINT_KEYS, base)})
    return Response(token.model_dump_json(exclude_none=True), media_type="application/json")


@router.get("/copilot_internal/user")
async def copilot_user(request: Request, state: State) -> Response:
    """The signed-in user's Copilot plan, asked right after the token exchange (same gate as it)."""
    state.auth.check_exchange(request.headers.get("authorization"))
    base = public_url(request, state)
    user = CopilotUser(login=USER_LOGIN, endpoints=dict.fromkeys(ENDPOINT_KEYS, base))
    return Response(user.model_dump_json(), media_type="application/json")


@router.get("/telemetry")
async def experiment_config() -> Response:
    """The experiment (A/B) config Copilot reads at `{endpoints.telemetry}/telemetry`: none, so defaults."""
    return Response(ExperimentConfig().model_dump_json(), media_type="application/json")


@router.post("/telemetry")
async def usage_events() -> Response:
    """Usage events that editors post to `{endpoints.telemetry}/telemetry`: accepted and dropped.

    Nothing leaves the fleet; the proxy's own metrics say what it served.
    """
    return Response(status_code=204)


class GitHubRequestIdMiddleware:
    """Give every response an `X-GitHub-Request-Id`, and log it with the request at debug level.

    Copilot clients name that id when a request fails, so the debug log ties an editor's error to the
    request the proxy saw. Pure ASGI (no response buffering), so streams pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex.upper()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-github-request-id", request_id.encode()),
                ]
                log.debug(
                    "%s %s -> %d (%s %s)",
                    scope["method"],
                    scope["path"],
                    message["status"],
                    REQUEST_ID_HEADER,
                    request_id,
                )
            await send(message)

        await self.app(scope, receive, send_with_id)
