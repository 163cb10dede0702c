"""The route table (operator -> proxy contract) and the watcher that hot-reloads it.

The operator builds a `RouteTable`, dumps it with `RouteTable.to_yaml()` into ConfigMap `pilotfleet-routes`
(key `routes.yaml`), and every proxy pod watches the mounted file. The kubelet updates ConfigMap volumes by
swapping a symlink, so the watcher compares what the path resolves to (target, inode, mtime, size), not only
the file's own modification time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

# Model names travel in URLs (/v1/engines/{engine}/completions): keep them path-safe.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,126}$"
TRITON_TOKENIZER_SCHEME = "triton://"


class FimTemplate(BaseModel):
    """How a model spells fill-in-the-middle: its three marker tokens and their order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(min_length=1, description="Marker before the code above the cursor.")
    suffix: str = Field(min_length=1, description="Marker before the code below the cursor.")
    middle: str = Field(min_length=1, description="Marker after which the model writes the middle.")
    order: Literal["psm", "spm"] = Field(
        default="psm", description="psm: prefix, suffix, middle; spm: suffix first, then prefix, then middle."
    )


class ModelRoute(BaseModel):
    """One model of the fleet: the names clients use, where its Triton replicas are, how to talk to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="What clients send as `model` or Copilot engine.")
    aliases: tuple[str, ...] = Field(default=(), description="Other names that route to this model.")
    triton_model: str = Field(min_length=1, description="Unary model name in Triton.")
    streaming_model: str | None = Field(
        default=None,
        description="Decoupled twin for stream=true; without one, streams are served by the unary model.",
    )
    endpoints: tuple[str, ...] = Field(
        default=(),
        description="Triton gRPC host:port, one per replica or Service; empty means none ready (503).",
    )
    tokenizer: str = Field(
        min_length=1, description="Path to the model's tokenizer.json, or triton://<model> to fetch it."
    )
    context_length: int = Field(default=2048, gt=1)
    default_max_tokens: int = Field(default=64, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    end_id: int | None = Field(default=None, ge=0, description="Token id that ends a generation.")
    fim: FimTemplate | None = None

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        for alias in self.aliases:
            if not _valid_name(alias):
                raise ValueError(f"alias {alias!r} must match {NAME_PATTERN}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        return self

    def names(self) -> tuple[str, ...]:
        """The name and every alias."""
        return (self.name, *self.aliases)


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


class RouteTable(BaseModel):
    """The fleet's route table: every model the proxies serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    models: tuple[ModelRoute, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen: dict[str, str] = {}
        for route in self.models:
            for name in route.names():
                if name in seen:
                    raise ValueError(
                        f"name {name!r} of model {route.name!r} is already used by {seen[name]!r}"
                    )
                seen[name] = route.name
        return self

    def lookup(self, name: str) -> ModelRoute | None:
        """Return the route whose name or alias is `name`."""
        for route in self.models:
            if name in route.names():
                return route
        return None

    @classmethod
    def from_yaml(cls, text: str) -> RouteTable:
        """Parse the YAML form; an empty document is an empty table."""
        data = yaml.safe_load(text)
        return cls.model_validate(data or {})

    def to_yaml(self) -> str:
        """The YAML form the operator writes and the proxy reads."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_route_table(path: Path) -> RouteTable:
    """Read and validate the route table at `path` (a missing file is an empty table)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        log.warning("route table %s does not exist yet: serving no models", path)
        return RouteTable()
    return RouteTable.from_yaml(text)


def _file_identity(path: Path) -> tuple[str, int, int, int, int] | None:
    """What changes when the file is rewritten in place or its symlink chain is swapped."""
    try:
        # os.stat follows symlinks: a ConfigMap swap gives a new target inode even with an equal mtime.
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class RouteWatcher:
    """Poll the route table file and hand every new valid table to `on_change`; keep the old one on errors."""

    def __init__(
        self,
        path: Path,
        poll_s: float,
        on_change: Callable[[RouteTable], Awaitable[None]],
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.path = path
        self.poll_s = poll_s
        self.on_change = on_change
        self.on_error = on_error
        self._identity: tuple[str, int, int, int, int] | None = None
        self._checked = False
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Reload if the file changed since the last check; return True when a new table was applied."""
        identity = _file_identity(self.path)
        if identity == self._identity and self._checked:
            return False
        self._identity = identity
        self._checked = True
        try:
            table = load_route_table(self.path)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            log.error("route table %s is invalid, keeping the previous one: %s", self.path, exc)
            if self.on_error:
                self.on_error(exc)
            return False
        await self.on_change(table)
        return True

    async def start(self) -> None:
        """Load the table once now, then keep watching in the background."""
        await self.check()
        self._task = asyncio.create_task(self._run(), name="route-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check()
            except Exception:
                # A failure applying one table must not end hot reload for the life of the pod.
                log.exception("applying route table %s failed", self.path)

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
