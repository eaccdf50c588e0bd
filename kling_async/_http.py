"""The HTTP shell: one aiohttp session, one attempt per call, exceptions made typed.

This is the only module that imports the aiohttp client. It sends exactly one request per
:meth:`HttpTransport.send` and says precisely how it failed, because the create path's
exactly-once rule hangs on one question: could the request have reached the server?
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import attrs

from ._errors import TransportError
from ._retry import parse_retry_after
from ._version import __version__

__all__ = ["HttpTransport", "RawResponse", "Timeouts"]

log = logging.getLogger("kling_async")


@attrs.frozen(kw_only=True)
class Timeouts:
    """Seconds allowed to connect, and to wait for each read of an answer.

    No total cap: the read timeout already bounds a silent server, and a slow but moving
    answer should not be cut.
    """

    connect: float = 10.0
    read: float = 30.0


@attrs.frozen
class RawResponse:
    status: int
    body: bytes
    request_id: str | None = None
    retry_after: float | None = None


class HttpTransport:
    """Owns the aiohttp session; nothing else in the SDK touches aiohttp's client."""

    def __init__(
        self,
        base_url: str,
        *,
        timeouts: Timeouts,
        max_connections: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is not None:
            return
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeouts.connect,
            sock_connect=self.timeouts.connect,
            sock_read=self.timeouts.read,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self._max_connections),
            headers={"User-Agent": f"kling-async/{__version__}", "Accept": "application/json"},
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(
                "the client is not open: use it inside `async with KlingClient(...)`"
            )
        return self._session

    async def send(
        self,
        method: str,
        path: str,
        *,
        authorization: str,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> RawResponse:
        """One HTTP request. Raises :class:`TransportError` when no full answer arrived."""
        url = self.base_url + path
        headers = {"Authorization": authorization}
        try:
            async with self.session.request(
                method, url, params=params, json=json_body, headers=headers, allow_redirects=False
            ) as response:
                body = await response.read()
                status = response.status
                request_id = response.headers.get("X-Request-Id") or response.headers.get(
                    "X-Kling-Request-Id"
                )
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Connect refused, DNS, TLS handshake, connect timeout: nothing left this machine.
            raise TransportError(
                f"{method} {path}: could not connect ({type(exc).__name__})", request_sent=False
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Read timeout, reset, disconnect, bad payload: the server may have acted on it.
            raise TransportError(
                f"{method} {path}: no complete answer ({type(exc).__name__}: {exc})",
                request_sent=True,
            ) from exc
        log.debug("%s %s -> HTTP %s (%d bytes)", method, path, status, len(body))
        return RawResponse(status, body, request_id, retry_after)
