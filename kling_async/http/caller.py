"""One authenticated API call: auth header, one re-mint on 1003/1004, retries for safe calls.

Reads (GET) are idempotent, so they retry everything a retry can fix: transport errors, 5xx,
1302 and garbage bodies, through the shell's one retry primitive
(:class:`~kling_async.http.retrying.Retrying`: backoff bounded in attempts and time, honouring
Retry-After, within the client's retry budget; a 1302 is flow control, not a failure, and is
not charged to it). Creates are not idempotent; they use :meth:`Api.send_once` and decide for
themselves (:mod:`kling_async.http.create`). Every outcome feeds the client's
:class:`~kling_async.http.health.Health`; once it says the host is unreachable, reads that
cannot connect stop retrying and raise its :class:`UnreachableError`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from kling_async._errors import (
    AuthenticationError,
    KlingError,
    RateLimitError,
    Redactor,
    ResponseDecodeError,
    ServerError,
    ThrottledError,
    TransportError,
)
from kling_async.http.health import Health
from kling_async.http.retrying import RetryBudget, Retrying
from kling_async.http.transport import HttpTransport, RawResponse
from kling_async.protocol.auth import Auth
from kling_async.protocol.converter import decode_envelope
from kling_async.protocol.retry import RetryPolicy

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
        health: Health | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.transport = transport
        self.auth = auth
        self.retry = retry
        self.budget = RetryBudget.of(retry)
        self.health = health or Health(transport.host, unreachable_after=None)
        self._before_request = before_request
        self._on_rate_limited = on_rate_limited
        self.rng = rng or random.Random()
        #: Cleans text that came from outside of this client's secrets (see ``Redactor``).
        #: ``secrets`` are the client's other secrets (its callback URL carries a token).
        extra = tuple(secrets)
        self.redact = Redactor(lambda: (*auth.secrets(), *extra))

    async def send_once(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        query: bool = False,
        attempt: int = 1,
        shortcut: Callable[[int, bytes], Any] | None = None,
    ) -> Any:
        """One logical attempt; returns ``data`` or raises the typed error. ``attempt`` is its
        number within its call (for the debug log). ``shortcut`` sees each answer's status
        and body first: what it returns, unless None, is returned instead of the decoded
        ``data`` (the poller pool's "unchanged since last time", which skips the decoding).

        A 1003/1004 (token not yet valid / expired) is the only case sent twice here: the server
        rejected the credential before looking at the request, so a re-mint and one more try is
        safe even for a create.
        """
        reminted = False
        while True:
            response = await self._send(
                method, path, params=params, json_body=json_body, attempt=attempt
            )
            if shortcut is not None:
                known = shortcut(response.status, response.body)
                if known is not None:
                    return known
            try:
                return decode_envelope(
                    response.status,
                    response.body,
                    query=query,
                    header_request_id=response.request_id,
                    redact=self.redact,
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
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        json_body: Any,
        attempt: int,
    ) -> RawResponse:
        if self._before_request is not None:
            await self._before_request()
        try:
            response = await self.transport.send(
                method,
                path,
                authorization=self.auth.header(),
                params=params,
                json_body=json_body,
                redact=self.redact,
                attempt=attempt,
            )
        except TransportError as exc:
            self.health.failed(exc)
            raise
        self.health.answered(server_error=response.status >= 500)
        if self.budget is not None and response.status < 500 and response.status != 429:
            self.budget.answered()
        return response

    def offered(self) -> None:
        """A new operation's first request: it feeds the retry budget."""
        if self.budget is not None:
            self.budget.offered()

    def retrying(
        self,
        policy: RetryPolicy | None = None,
        *,
        deadline: float | None = None,
        last_try_at_deadline: bool = False,
    ) -> Retrying:
        """The retries of one call to the API host: ``policy`` (default: the client's), within
        the client's retry budget and the host's unreachable verdict."""
        return Retrying(
            policy or self.retry,
            budget=self.budget,
            health=self.health,
            deadline=deadline,
            rng=self.rng,
            last_try_at_deadline=last_try_at_deadline,
        )

    async def read(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        query: bool = False,
        offered: bool = True,
        shortcut: Callable[[int, bytes], Any] | None = None,
    ) -> Any:
        """A GET, retried for every failure a retry can fix, within the retry policy and the
        client's retry budget. ``offered=False`` marks a read that is itself a retry of a
        failed operation, already paid for by its caller (it deposits nothing); ``shortcut``
        is :meth:`send_once`'s."""
        retrying = self.retrying()
        if offered:
            self.offered()
        while True:
            try:
                return await self.send_once(
                    "GET",
                    path,
                    params=params,
                    query=query,
                    attempt=retrying.failures + 1,
                    shortcut=shortcut,
                )
            except KlingError as exc:
                if not is_retryable_read_error(exc):
                    raise
                if not await retrying.wait(exc):
                    if retrying.unreachable is not None:
                        raise retrying.unreachable from None
                    raise
                log.debug("GET %s failed (%s); retry %d", path, exc, retrying.failures)
