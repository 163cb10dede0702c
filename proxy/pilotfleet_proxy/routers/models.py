"""GET /v1/models (OpenAI) and GET /models (Copilot asks there): the models of the route table."""

from __future__ import annotations

from fastapi import APIRouter, Response

from pilotfleet_proxy.protocol import ModelCapabilities, ModelCard, ModelList
from pilotfleet_proxy.state import State

router = APIRouter(tags=["models"])


@router.get("/v1/models")
@router.get("/models")
async def list_models(state: State) -> Response:
    """Every model by its name, in route table order (Copilot's default engine is the first)."""
    created = state.fleet.loaded_at
    cards = [
        ModelCard(
            id=served.route.name,
            created=created,
            aliases=list(served.route.aliases),
            context_length=served.route.context_length,
            name=served.route.name,
            version=served.route.name,
            capabilities=ModelCapabilities(family=served.route.name),
        )
        for served in state.fleet.models()
    ]
    return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")
