"""The proxy's own auth: an optional shared token, and Copilot's token exchange answered by the proxy.

Copilot clients first swap their "GitHub token" for a Copilot token at /copilot_internal/v2/token and
then send that token with every completion. With no shared token configured the proxy is open: the
exchange hands out a token and completions need none. With one, the exchange only answers a client
that presents the shared token, and issues a token signed with it (HMAC-SHA256, expiry inside), so any
replica can check it without shared state; completions need the shared token or an unexpired issued one.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from pilotfleet_proxy.errors import ProxyError
from pilotfleet_proxy.protocol import CopilotToken

# Copilot tokens look like `k=v;k=v:signature`; clients read nothing from ours (no `proxy-ep`, so the
# editor keeps using the proxy URL it was configured with).
_TOKEN_PREFIX = "tid=pilotfleet;exp="


class TokenAuthority:
    """Issues and checks tokens; a no-op gate when no shared secret is configured."""

    def __init__(self, secret: str | None, ttl_s: int) -> None:
        self.secret = secret
        self.ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        """True when a shared token guards the proxy."""
        return bool(self.secret)

    def _sign(self, payload: str) -> str:
        assert self.secret is not None
        return hmac.new(self.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> CopilotToken:
        """A fresh token with its expiry, and when the client should refresh it."""
        issued = int(now if now is not None else time.time())
        expires = issued + self.ttl_s
        payload = f"{_TOKEN_PREFIX}{expires}"
        signature = self._sign(payload) if self.enabled else "open"
        # Refresh well before expiry so a slow clock or a long request never sees a dead token.
        return CopilotToken(token=f"{payload}:{signature}", expires_at=expires, refresh_in=self.ttl_s // 2)

    def _valid_issued(self, token: str, now: float) -> bool:
        payload, _, signature = token.rpartition(":")
        if not payload.startswith(_TOKEN_PREFIX):
            return False
        try:
            expires = int(payload.removeprefix(_TOKEN_PREFIX))
        except ValueError:
            return False
        return expires > now and hmac.compare_digest(signature, self._sign(payload))

    def _is_shared(self, token: str) -> bool:
        assert self.secret is not None
        return hmac.compare_digest(token.encode(), self.secret.encode())

    def check_exchange(self, authorization: str | None) -> None:
        """Gate the token exchange: the client must present the shared token (as `token` or `Bearer`)."""
        if not self.enabled:
            return
        if not self._is_shared(_credential(authorization)):
            raise ProxyError(401, "sign in with the proxy's shared token", code="invalid_token")

    def check_request(self, authorization: str | None, now: float | None = None) -> None:
        """Gate a completion: the shared token or an unexpired token this proxy fleet issued."""
        if not self.enabled:
            return
        credential = _credential(authorization)
        moment = now if now is not None else time.time()
        if not credential or not (self._is_shared(credential) or self._valid_issued(credential, moment)):
            raise ProxyError(
                401,
                "missing or invalid token",
                code="invalid_token",
                headers={"WWW-Authenticate": "Bearer"},
            )


def _credential(authorization: str | None) -> str:
    """The credential of an `Authorization: Bearer <t>` or `token <t>` header ('' when absent)."""
    if not authorization:
        return ""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() in ("bearer", "token"):
        return value.strip()
    return ""
