"""Credentials: a CometAPI bearer key, or Kling's access key + secret key minted into JWTs.

Both kinds keep their secrets out of ``repr`` and out of every message: the only place a key or
token appears is the ``Authorization`` header this module hands to the HTTP layer.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
import jwt

__all__ = [
    "ENV_ACCESS_KEY",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_SECRET_KEY",
    "Auth",
    "BearerAuth",
    "JWTAuth",
]

ENV_API_KEY = "KLING_API_KEY"
ENV_ACCESS_KEY = "KLING_ACCESS_KEY"
ENV_SECRET_KEY = "KLING_SECRET_KEY"  # noqa: S105 (a variable name, not a secret)
ENV_BASE_URL = "KLING_BASE_URL"


def wall_clock() -> float:
    """Unix seconds; a module-level seam so tests can move the JWT clock."""
    return time.time()


class Auth(Protocol):
    """Something that yields an ``Authorization`` header value."""

    @property
    def kind(self) -> str: ...

    def header(self) -> str: ...

    def invalidate(self) -> bool:
        """Forget a cached credential after a 1003/1004; True if a retry may now succeed."""
        ...

    def secrets(self) -> tuple[str, ...]:
        """Every secret this auth holds or has sent: text from outside is redacted of them."""
        ...


@attrs.define(repr=False)
class BearerAuth:
    """A CometAPI key sent as ``Authorization: Bearer <key>``."""

    _key: str

    kind = "bearer"

    def header(self) -> str:
        return f"Bearer {self._key}"

    def invalidate(self) -> bool:
        return False

    def secrets(self) -> tuple[str, ...]:
        return (self._key,)

    def __repr__(self) -> str:
        return "BearerAuth(key=***)"


@attrs.define(repr=False)
class JWTAuth:
    """Kling's official auth: an HS256 JWT ``{"iss": access_key, "exp", "nbf"}``.

    Tokens live ``ttl`` seconds (1800, as Kling's docs do) and are re-minted ``refresh_margin``
    seconds before they expire, so a long-lived client never sends a stale one; a 1004 answer
    forces one early re-mint. ``clock`` returns Unix seconds (default: the system clock).
    """

    _access_key: str
    _secret_key: str
    ttl: int = 1800
    refresh_margin: int = 300
    clock: Callable[[], float] | None = None
    _token: str | None = attrs.field(default=None, init=False)
    _expires_at: float = attrs.field(default=0.0, init=False)
    #: The last tokens minted: a server may still echo one after it was replaced.
    _minted: deque[str] = attrs.field(factory=lambda: deque(maxlen=8), init=False)

    kind = "jwt"

    def _now(self) -> float:
        return (self.clock or wall_clock)()

    def _mint(self) -> str:
        now = int(self._now())
        exp = now + self.ttl
        with warnings.catch_warnings():
            # The secret's length is Kling's choice, not the user's: do not warn on every mint.
            warnings.filterwarnings("ignore", message=".*HMAC key", category=UserWarning)
            token = jwt.encode(
                {"iss": self._access_key, "exp": exp, "nbf": now - 5},
                self._secret_key,
                algorithm="HS256",
                headers={"typ": "JWT"},
            )
        self._token, self._expires_at = token, float(exp)
        self._minted.append(token)
        return token

    def header(self) -> str:
        token = self._token
        if token is None or self._now() >= self._expires_at - self.refresh_margin:
            token = self._mint()
        return f"Bearer {token}"

    def invalidate(self) -> bool:
        self._token = None
        return True

    def secrets(self) -> tuple[str, ...]:
        return (self._access_key, self._secret_key, *self._minted)

    def __repr__(self) -> str:
        return "JWTAuth(access_key=***, secret_key=***)"
