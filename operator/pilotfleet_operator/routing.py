"""The fleet's route table, published from the operator's in-memory indexes.

Every reconcile wants the table to include its model as it is now. Rebuilding it is cheap (no API reads:
the models and their readiness are kopf indexes), writing it is not, so writes are coalesced: callers that
ask while a write is in flight are all served by the next one, which is computed after they asked, and a
table equal to the last one written is not written at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from pilotfleet_operator import builders
from pilotfleet_operator.apply import Kube
from pilotfleet_operator.models import CodeCompletionModel
from pilotfleet_operator.settings import Settings
from pilotfleet_operator.watch import ModelKey

log = logging.getLogger(__name__)

# {(namespace, name): None when routed, else why not} for every served model.
RouteResult = dict[ModelKey, str | None]


class RoutePublisher:
    """Writes the route table ConfigMap; one instance per operator, used on kopf's event loop."""

    def __init__(
        self, kube: Kube, settings: Settings, on_change: Callable[[Iterable[ModelKey]], None]
    ) -> None:
        """`on_change` is called with the models whose route problem (e.g. a name conflict) changed."""
        self._kube = kube
        self._settings = settings
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._asked = 0
        self._served = 0
        self._written: list[dict[str, Any]] | None = None
        self._result: RouteResult = {}

    async def publish(
        self,
        models: Mapping[ModelKey, Iterable[CodeCompletionModel]],
        ready: Collection[ModelKey],
        asked_by: ModelKey | None = None,
    ) -> RouteResult:
        """Make the table reflect `models` (the served models) and `ready` (those with a ready replica)
        as they are after this call began; return where each model stands in it."""
        self._asked += 1
        ticket = self._asked
        async with self._lock:
            if self._served < ticket:
                # Everyone who asked so far is served by a table computed from here on.
                covered = self._asked
                await self._write(models, ready, asked_by)
                self._served = covered
            return self._result

    def _apply(self, entries: list[dict[str, Any]]) -> None:
        self._kube.apply(builders.routes_configmap(entries, self._settings))

    async def _write(
        self,
        models: Mapping[ModelKey, Iterable[CodeCompletionModel]],
        ready: Collection[ModelKey],
        asked_by: ModelKey | None,
    ) -> None:
        fleet = [model for entries in models.values() for model in entries]
        entries, problems = builders.route_entries(fleet, set(ready), self._settings)
        # Comparing entries is cheap; rendering the table's YAML is not.
        if entries != self._written:
            await asyncio.to_thread(self._apply, entries)
            self._written = entries
            log.debug("route table written: %d models", len(entries))
        result: RouteResult = {(m.namespace, m.name): None for m in fleet}
        result.update(problems)
        # A model's Routed condition can change because of another model (a conflicting name freed).
        changed = {
            key for key in result.keys() | self._result.keys() if result.get(key) != self._result.get(key)
        }
        self._result = result
        self._on_change(key for key in changed if key != asked_by and key in result)
