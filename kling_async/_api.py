"""One authenticated API call: auth header, one re-mint on 1003/1004, retries for safe calls.

Reads (GET) are idempotent, so they retry everything a retry can fix: transport errors, 5xx,
1302 and garbage bodies, with backoff bounded in attempts and time and honouring Retry-After.
Creates are not idempotent; they use :meth:`Api.send_once` and decide for themselves
(:mod:`._create`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from ._auth import Auth
from ._errors import (
    AuthenticationError,
    KlingError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    ThrottledError,
    TransportError,
)
from ._http import HttpTransport, RawResponse
from ._retry import RetryPolicy
from ._wire import decode_envelope

__all__ = ["Api", "is_retryable_read_error"]

log = logging.getLogger("kling_async")

_REMINT_CODES = (1003, 1004)


def is_retryable_read_error(exc: BaseException) -> bool:
    """True for failures that a repeated GET can fix (never a 4xx verdict)."""
    return isinstance(exc, TransportError | ServerError | RateLimitError | ResponseDecodeError)


class Api:
    """Sends authenticated requests through one transport, under one request budget."""

    def __init__(
        self,
        transport: HttpTransport,
        auth: Auth,
        *,
        retry: RetryPolicy,
        before_request: Callable[[], Awaitable[None]] | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.transport = transport
        self.auth = auth
        self.retry = retry
        self._before_request = before_request
        self._on_rate_limited = on_rate_limited
        self.rng = rng or random.Random()

    async def send_once(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        query: bool = False,
    ) -> Any:
        """One logical attempt; returns ``data`` or raises the typed error.

        A 1003/1004 (token not yet valid / expired) is the only case sent twice here: the server
        rejected the credential before looking at the request, so a re-mint and one more try is
        safe even for a create.
        """
        reminted = False
        while True:
            response = await self._send(method, path, params=params, json_body=json_body)
            try:
                return decode_envelope(
                    response.status,
                    response.body,
                    query=query,
                    header_request_id=response.request_id,
                )
            except AuthenticationError as exc:
                if exc.code in _REMINT_CODES and not reminted and self.auth.invalidate():
                    reminted = True
                    log.info("token rejected (code %s); minted a fresh one", exc.code)
                    continue
                raise
            except ThrottledError as exc:
                exc.retry_after = response.retry_after
                if isinstance(exc, RateLimitError) and self._on_rate_limited is not None:
                    # 1302 is about the account's request rate: slow every caller down at once.
                    self._on_rate_limited(response.retry_after)
                raise

    async def _send(
        self, method: str, path: str, *, params: Mapping[str, str] | None, json_body: Any
    ) -> RawResponse:
        if self._before_request is not None:
            await self._before_request()
        return await self.transport.send(
            method, path, authorization=self.auth.header(), params=params, json_body=json_body
        )

    async def read(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        query: bool = False,
    ) -> Any:
        """A GET, retried within the retry budget for every failure a retry can fix."""
        deadline = time.monotonic() + self.retry.timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.send_once("GET", path, params=params, query=query)
            except KlingError as exc:
                if not is_retryable_read_error(exc):
                    raise
                delay = self.retry.delay(
                    attempt,
                    rng=self.rng,
                    retry_after=getattr(exc, "retry_after", None),
                    throttled=isinstance(exc, RateLimitError),
                )
                if attempt >= self.retry.attempts or time.monotonic() + delay > deadline:
                    raise
                log.debug("GET %s failed (%s); retry %d in %.2fs", path, exc, attempt, delay)
                await anyio.sleep(delay)
