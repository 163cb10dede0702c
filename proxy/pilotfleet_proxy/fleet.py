"""The models the proxy serves right now: built from each route table, swapped in whole on reload."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from pilotfleet_proxy.backend import EndpointRegistry, ModelBackend
from pilotfleet_proxy.errors import ProxyError
from pilotfleet_proxy.routes import ModelRoute, RouteTable
from pilotfleet_proxy.settings import ProxySettings
from pilotfleet_proxy.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One route with its backend and (lazily loaded, retried after failures) tokenizer."""

    route: ModelRoute
    backend: ModelBackend
    settings: ProxySettings
    _tokenizer: Tokenizer | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, loaded on first use; a failure is a 503 and the next request retries."""
        if self._tokenizer is not None:
            return self._tokenizer
        async with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = await load_tokenizer(self.route.tokenizer, self.backend.fetch_tokenizer)
                except ProxyError as exc:
                    raise ProxyError(
                        503,
                        f"tokenizer of model {self.route.name} is unavailable: {exc.message}",
                        code="tokenizer_unavailable",
                        headers={"Retry-After": str(self.settings.retry_after_s)},
                    ) from exc
                except Exception as exc:
                    # tokenizers raises plain Exception for a malformed tokenizer.json.
                    log.error("cannot load tokenizer %s: %s", self.route.tokenizer, exc)
                    raise ProxyError(
                        503,
                        f"tokenizer of model {self.route.name} cannot be loaded",
                        code="tokenizer_unavailable",
                        headers={"Retry-After": str(self.settings.retry_after_s)},
                    ) from exc
            return self._tokenizer


class Fleet:
    """The current route table, its models by every name, and the shared Triton endpoints."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.endpoints = EndpointRegistry()
        self.table = RouteTable()
        self.loaded = False
        self.loaded_at = 0
        self._by_name: dict[str, ServedModel] = {}

    async def apply(self, table: RouteTable) -> None:
        """Serve `table` from now on; a model whose route did not change keeps its tokenizer and caches."""
        previous = {served.route.name: served for served in self._by_name.values()}
        by_name: dict[str, ServedModel] = {}
        for route in table.models:
            served = previous.get(route.name)
            if served is None or served.route != route:
                backend = ModelBackend(
                    name=route.name,
                    triton_model=route.triton_model,
                    streaming_model=route.streaming_model,
                    endpoints=[self.endpoints.get(url) for url in route.endpoints],
                    settings=self.settings,
                )
                served = ServedModel(route=route, backend=backend, settings=self.settings)
            for name in route.names():
                by_name[name] = served
        self._by_name = by_name
        self.table = table
        self.loaded = True
        self.loaded_at = int(time.time())
        await self.endpoints.keep_only(url for route in table.models for url in route.endpoints)
        log.info("serving %d models: %s", len(table.models), ", ".join(r.name for r in table.models) or "-")

    def resolve(self, name: str) -> ServedModel:
        """The model called `name` (or aliased so); 404 when none is."""
        served = self._by_name.get(name)
        if served is None:
            raise ProxyError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return served

    def models(self) -> list[ServedModel]:
        """Every served model once, in route table order."""
        return [self._by_name[route.name] for route in self.table.models]

    async def close(self) -> None:
        """Close every Triton client."""
        await self.endpoints.close()
