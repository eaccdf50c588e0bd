"""The HTTP shell: one aiohttp session, one attempt per call, exceptions made typed.

This is the only module that imports the aiohttp client. It sends exactly one request per
:meth:`HttpTransport.send` and says precisely how it failed, because the create path's
exactly-once rule hangs on one question: could the request have reached the server?
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import attrs
import yarl

from ._errors import TransportError, redact_url
from ._retry import parse_retry_after
from ._version import __version__

__all__ = ["ByteStream", "HttpTransport", "RawResponse", "Timeouts", "redact_url"]

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


class ByteStream:
    """An answer whose body is read in chunks (a result file), from :meth:`HttpTransport.stream`.

    Failures while reading become :class:`TransportError` (``request_sent=True``), so callers
    handle one exception type whether the connection broke before or during the body.
    """

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def chunks(self, size: int = 64 * 1024) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(size):
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(
                f"GET {self._url}: the body was cut short ({type(exc).__name__}: {exc})",
                request_sent=True,
            ) from exc


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

    @asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[ByteStream]:
        """GET an absolute URL (a result file) and hold the answer open to read it in chunks.

        No ``Authorization`` header is sent: result files live on a CDN that may belong to a
        third party, and the signed URL is all it needs. Redirects are not followed, so that
        the caller can check every hop against its rules. The URL is sent exactly as given
        (``encoded=True``): re-quoting a signed URL would break its signature.
        """
        shown = redact_url(url)
        try:
            response = await self.session.get(
                yarl.URL(url, encoded=True),
                allow_redirects=False,
                headers={"Accept": "*/*"},
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise TransportError(
                f"GET {shown}: could not connect ({type(exc).__name__})", request_sent=False
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise TransportError(
                f"GET {shown}: no answer ({type(exc).__name__}: {exc})", request_sent=True
            ) from exc
        try:
            log.debug("GET %s -> HTTP %s", shown, response.status)
            yield ByteStream(response, shown)
        finally:
            if response.content.at_eof():
                response.release()  # read to the end: the connection can serve the next file
            else:
                # Dropping a connection whose body was not read to the end beats draining the
                # rest of a file nobody wants.
                response.close()
