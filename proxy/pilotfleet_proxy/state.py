"""What every request handler needs from its app, in one object on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from pilotfleet_proxy.auth import TokenAuthority
from pilotfleet_proxy.fleet import Fleet
from pilotfleet_proxy.metrics import ProxyMetrics
from pilotfleet_proxy.settings import ProxySettings


@dataclass
class ProxyState:
    """The app's settings, served models, metrics and token authority."""

    settings: ProxySettings
    fleet: Fleet
    metrics: ProxyMetrics
    auth: TokenAuthority


def get_state(request: Request) -> ProxyState:
    """The state of the app serving `request` (a FastAPI dependency)."""
    state = request.app.state.pilotfleet
    assert isinstance(state, ProxyState)
    return state


# Handler parameter type that FastAPI fills with the app's state.
State = Annotated[ProxyState, Depends(get_state)]
