"""Copilot's token exchange, answered by the proxy itself (see `pilotfleet_proxy.auth`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response

from pilotfleet_proxy.state import State

router = APIRouter(tags=["copilot"])


@router.get("/copilot_internal/v2/token")
async def copilot_token(request: Request, state: State) -> Response:
    """Swap the client's sign-in token for a Copilot token: {token, expires_at, refresh_in}."""
    state.auth.check_exchange(request.headers.get("authorization"))
    token = state.auth.issue()
    # Today's Copilot language servers reject a token response without this header.
    headers = {"X-GitHub-Request-Id": uuid.uuid4().hex.upper()}
    return Response(token.model_dump_json(), media_type="application/json", headers=headers)
