"""The proxy's settings: typed, from `PILOTFLEET_PROXY_*` environment variables, read once at startup."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProxySettings(BaseSettings):
    """Everything the proxy can be told; build one with `ProxySettings()` and pass it to `create_app`."""

    model_config = SettingsConfigDict(env_prefix="PILOTFLEET_PROXY_", extra="forbid")

    routes_file: Path = Field(
        default=Path("/etc/pilotfleet/routes.yaml"),
        description="The route table (operator's ConfigMap mount); watched and hot-reloaded.",
    )
    routes_poll_s: float = Field(default=1.0, gt=0, description="How often the route table file is checked.")
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Deadline for a whole unary completion and for each streamed step (504).",
    )
    max_outstanding_per_endpoint: int = Field(
        default=256, ge=1, description="Requests in flight per Triton endpoint before new ones get 429."
    )
    max_request_bytes: int = Field(default=1_048_576, ge=1024, description="Larger request bodies get 413.")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After sent with 429 and 503.")
    endpoint_cooldown_s: float = Field(
        default=2.0, ge=0, description="An endpoint that failed to connect is avoided for this long."
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description=(
            "Optional shared secret. When set, completions need `Authorization: Bearer` with this token or "
            "a token the proxy issued at /copilot_internal/v2/token; when unset, the proxy is open."
        ),
    )
    token_ttl_s: int = Field(
        default=1800, ge=60, description="Lifetime of tokens issued by the token exchange."
    )
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#]+(/[^?#]*)?$",
        description=(
            "The URL editors reach the proxy at (e.g. the Ingress's https URL), put in the Copilot token's "
            "`endpoints`; unset, it is taken from each token request (its Host header and scheme)."
        ),
    )
