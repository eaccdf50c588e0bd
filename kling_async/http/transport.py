"""The HTTP shell: aiohttp sessions, one attempt per call, exceptions made typed.

This is the only module that imports the aiohttp client. It sends exactly one request per
:meth:`HttpTransport.send` and says precisely how it failed, because the create path's
exactly-once rule hangs on one question: could the request have reached the server?

aiohttp's own exceptions are described in our messages but never kept as ``__cause__`` or
``__context__``: several of them carry the request's headers, ``Authorization`` included, and
an exception chain ends up in logs and tracebacks. Text that came from the server (a status
line, a reason) passes through the caller's redactor first.

Result files are fetched through separate sessions, one per :class:`AddressPolicy`, whose
resolver enforces the policy on the addresses it hands to the connector (see ``addresses``):
a pooled connection is never shared between two policies.

Proxies: with ``trust_env`` (the default) the proxy settings of the environment are honoured,
``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``NO_PROXY`` (any case), read when the
transport opens, for the API and for result files alike; ``trust_env=False`` connects
directly whatever the environment says. The sessions themselves are always made with
aiohttp's ``trust_env=False``, and the proxy is passed per request: aiohttp's own
``trust_env=True`` also reads ``~/.netrc`` (or ``$NETRC``) and sends the login it finds for a
host (the ``default`` entry for any host) as Basic auth, which would hand a netrc password
to whatever CDN a result URL names, and would make every API request fail (aiohttp refuses a
netrc login alongside our ``Authorization`` header). No credential from a netrc file is ever
sent. A proxy's own login goes in its URL (``http://user:pass@proxy:3128``), and is sent to
the proxy only. Through a proxy the proxy connects, not this machine, so a result file's
host must resolve *here* to public addresses (or be the API host, or be in
``allowed_hosts``) before the request goes to the proxy.

Counts: :attr:`HttpTransport.api_requests` and :attr:`HttpTransport.file_requests` count the
requests sent (each attempt, whatever its outcome). At DEBUG, each attempt is one log line
(method, path without query values, status, request id, elapsed ms, attempt number).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import aiohttp.abc
import aiohttp.resolver
import attrs
import yarl

from kling_async._errors import (
    AddressRefused,
    DownloadError,
    TransportError,
    UsageError,
    no_redaction,
    redact_url,
)
from kling_async._version import __version__
from kling_async.http.addresses import AddressPolicy, parse_ip_literal
from kling_async.protocol.retry import parse_retry_after

__all__ = ["ByteStream", "HttpTransport", "RawResponse", "Timeouts", "redact_url"]

log = logging.getLogger("kling_async")

Redact = Callable[[str], str]

_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_OTHER_ERRORS = (TimeoutError, aiohttp.ClientError, OSError, ValueError)


@attrs.frozen(kw_only=True)
class Timeouts:
    """Seconds allowed to connect, and to wait for each read of an answer.

    No total cap: the read timeout already bounds a silent server, and a slow but moving
    answer should not be cut (downloads set their own overall deadline).
    """

    connect: float = 10.0
    read: float = 30.0


@attrs.frozen
class RawResponse:
    status: int
    body: bytes
    request_id: str | None = None
    retry_after: float | None = None


def connect_reason(exc: BaseException) -> str:
    """Why a connection could not be made, in a few words a person recognises."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate not trusted"
    if isinstance(exc, aiohttp.ClientConnectorSSLError) or isinstance(cause, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(cause, socket.gaierror):
        return f"DNS lookup failed ({cause.strerror or cause})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, aiohttp.ConnectionTimeoutError) or isinstance(cause, TimeoutError):
        return "connect timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return type(cause).__name__


def describe(exc: BaseException, redact: Redact = no_redaction) -> str:
    """``Type: message`` for an aiohttp or OS error, with server-provided text redacted and
    without the request details some of them carry in their arguments."""
    if isinstance(exc, aiohttp.ClientResponseError):
        text = f"HTTP {exc.status}, {exc.message}"
    elif isinstance(exc, _CONNECT_ERRORS):
        text = connect_reason(exc)
    else:
        text = str(exc)
    text = " ".join(redact(text).split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _refusal(exc: BaseException) -> AddressRefused | None:
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, AddressRefused):
        return exc.os_error
    return None


class ByteStream:
    """An answer whose body is read in chunks (a result file), from :meth:`HttpTransport.stream`.

    Failures while reading become :class:`TransportError` (``request_sent=True``), so callers
    handle one exception type whether the connection broke before or during the body.
    """

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url

    @property
    def url(self) -> str:
        """The URL without its query string (fit for messages)."""
        return self._url

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def chunks(self, size: int = 64 * 1024) -> AsyncGenerator[bytes, None]:
        iterator = self._response.content.iter_chunked(size).__aiter__()
        while True:
            failure: TransportError | None = None
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except _OTHER_ERRORS as exc:
                failure = TransportError(
                    f"GET {self._url}: the body was cut short ({describe(exc)})",
                    request_sent=True,
                    host=self._response.url.host,
                )
            if failure is not None:
                raise failure  # outside the handler: no aiohttp error in the chain
            yield chunk


def _shown_path(path: str, params: Mapping[str, str] | None) -> str:
    """A path for the debug log: query parameter names, never their values."""
    if not params:
        return path
    return path + "?" + "&".join(f"{name}=..." for name in params)


#: ``NO_PROXY`` matching, from the given settings (urllib's; typeshed does not declare it).
_proxy_bypass: Callable[[str, dict[str, str]], bool] = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]


def _body_request_id(body: bytes) -> str | None:
    """The envelope's ``request_id``, for the debug line only (parsed only when it is on)."""
    if not body.startswith(b"{"):
        return None
    try:
        value = json.loads(body).get("request_id")
    except (ValueError, AttributeError):
        return None
    return " ".join(value.split())[:80] if isinstance(value, str) and value else None


class _Proxies:
    """The environment's proxy settings, read once (``urllib``'s reading of the variables,
    which is aiohttp's, without the netrc file and without the system registries)."""

    def __init__(self, trust_env: bool) -> None:
        found = urllib.request.getproxies_environment() if trust_env else {}
        self._env = found
        self._urls: dict[str, yarl.URL] = {}
        for scheme in ("http", "https"):
            value = found.get(scheme) or found.get("all")
            if value:
                url = yarl.URL(value)
                if url.scheme in ("http", "https") and url.host:
                    self._urls[scheme] = url

    @property
    def hosts(self) -> frozenset[str]:
        """The proxies' hosts: configuration, not network input, so downloads may connect."""
        return frozenset(url.host for url in self._urls.values() if url.host)

    def for_url(self, url: yarl.URL) -> tuple[yarl.URL | None, aiohttp.BasicAuth | None]:
        """The proxy for ``url`` (None: connect directly) and the proxy's own login."""
        proxy = self._urls.get(url.scheme)
        host = url.host
        if proxy is None or not host:
            return None, None
        if _proxy_bypass(host, self._env):
            return None, None
        auth = None
        if proxy.user is not None:
            auth = aiohttp.BasicAuth(proxy.user, proxy.password or "")
            proxy = proxy.with_user(None)
        return proxy, auth


class _GuardedResolver(aiohttp.abc.AbstractResolver):
    """The system resolver, with the download policy applied to every answer: the connector
    connects only to addresses this returns, so the check is on the address used. The
    configured proxies are reached whatever their addresses (the user chose them)."""

    def __init__(self, policy: AddressPolicy, proxies: frozenset[str] = frozenset()) -> None:
        self._inner = aiohttp.resolver.DefaultResolver()
        self._policy = policy
        self._proxies = proxies

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        if host in self._proxies:
            return await self._inner.resolve(host, port, family)
        self._policy.check_host(host)
        results = await self._inner.resolve(host, port, family)
        self._policy.check_resolved(host, [result["host"] for result in results])
        return results

    async def check(self, host: str) -> None:
        """Resolve ``host`` only to check it (a proxy will connect): AddressRefused or OSError."""
        self._policy.check_host(host)
        if self._policy.allow_private or self._policy.trusts(host):
            return
        if parse_ip_literal(host) is not None:
            return
        results = await self._inner.resolve(host, 0, socket.AF_UNSPEC)
        self._policy.check_resolved(host, [result["host"] for result in results])

    async def close(self) -> None:
        await self._inner.close()


class HttpTransport:
    """Owns the aiohttp sessions; nothing else in the SDK touches aiohttp's client."""

    def __init__(
        self,
        base_url: str,
        *,
        timeouts: Timeouts,
        max_connections: int = 100,
        ssl_context: ssl.SSLContext | None = None,
        trust_env: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = yarl.URL(self.base_url).host or ""
        self.timeouts = timeouts
        self._max_connections = max_connections
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        #: Honour the environment's proxy settings (never its netrc file: see the module).
        self.trust_env = trust_env
        self._proxies = _Proxies(False)
        self._session: aiohttp.ClientSession | None = None
        self._file_sessions: dict[
            AddressPolicy, tuple[aiohttp.ClientSession, _GuardedResolver]
        ] = {}
        #: Requests sent to the API (each attempt, answered or not).
        self.api_requests = 0
        #: Requests sent for result files (each attempt and each redirect hop).
        self.file_requests = 0

    def _new_session(self, resolver: aiohttp.abc.AbstractResolver | None) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeouts.connect,
            sock_connect=self.timeouts.connect,
            sock_read=self.timeouts.read,
        )
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ssl=self._ssl, resolver=resolver
        )
        return aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            headers={"User-Agent": f"kling-async/{__version__}", "Accept": "application/json"},
            raise_for_status=False,
            # Never aiohttp's: it would read ~/.netrc too (see the module); proxies are ours.
            trust_env=False,
        )

    async def open(self) -> None:
        if self._session is None:
            self._proxies = _Proxies(self.trust_env)
            self._session = self._new_session(None)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        sessions = [session, *(each for each, _resolver in self._file_sessions.values())]
        self._file_sessions = {}
        for each in sessions:
            if each is not None:
                await each.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise UsageError("the client is not open: use it inside `async with KlingClient(...)`")
        return self._session

    def _file_session(
        self, policy: AddressPolicy
    ) -> tuple[aiohttp.ClientSession, _GuardedResolver]:
        self.session  # noqa: B018 (raises when the client is not open)
        pair = self._file_sessions.get(policy)
        if pair is None:
            resolver = _GuardedResolver(policy, self._proxies.hosts)
            pair = self._file_sessions[policy] = (self._new_session(resolver), resolver)
        return pair

    async def send(
        self,
        method: str,
        path: str,
        *,
        authorization: str,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        redact: Redact = no_redaction,
        attempt: int = 1,
    ) -> RawResponse:
        """One HTTP request. Raises :class:`TransportError` when no full answer arrived.

        ``attempt`` is its number within its call, for the debug log line."""
        url = self.base_url + path
        headers = {"Authorization": authorization}
        session = self.session
        proxy, proxy_auth = self._proxies.for_url(yarl.URL(url))
        debug = log.isEnabledFor(logging.DEBUG)
        started = time.perf_counter() if debug else 0.0
        failure: TransportError | None = None
        self.api_requests += 1
        try:
            async with session.request(
                method,
                url,
                params=params,
                json=json_body,
                headers=headers,
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as response:
                body = await response.read()
                status = response.status
                request_id = response.headers.get("X-Request-Id") or response.headers.get(
                    "X-Kling-Request-Id"
                )
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except _CONNECT_ERRORS as exc:
            # Connect refused, DNS, TLS handshake, connect timeout: nothing left this machine.
            reason = connect_reason(exc)
            failure = TransportError(
                f"{method} {path}: could not connect to {self.host} ({reason})",
                request_sent=False,
                host=self.host,
                reason=reason,
            )
        except _OTHER_ERRORS as exc:
            # Read timeout, reset, disconnect, bad payload: the server may have acted on it.
            failure = TransportError(
                f"{method} {path}: no complete answer from {self.host} ({describe(exc, redact)})",
                request_sent=True,
                host=self.host,
            )
        if failure is not None:
            if debug:
                log.debug(
                    "%s %s -> failed: %s; %.0f ms, attempt %d",
                    method,
                    _shown_path(path, params),
                    failure,
                    (time.perf_counter() - started) * 1000,
                    attempt,
                )
            raise failure  # outside the handler, so the aiohttp error is not its __context__
        if debug:
            log.debug(
                "%s %s -> HTTP %s, request_id %s, %d bytes; %.0f ms, attempt %d",
                method,
                _shown_path(path, params),
                status,
                redact(request_id or _body_request_id(body) or "-"),
                len(body),
                (time.perf_counter() - started) * 1000,
                attempt,
            )
        # The request id is server text too; the decoder redacts it if an error quotes it.
        return RawResponse(status, body, request_id, retry_after)

    @asynccontextmanager
    async def stream(
        self, url: str, *, policy: AddressPolicy, stall_timeout: float | None = None
    ) -> AsyncIterator[ByteStream]:
        """GET an absolute URL (a result file) and hold the answer open to read it in chunks.

        No ``Authorization`` header is sent: result files live on a CDN that may belong to a
        third party, and the signed URL is all it needs. The connection may go only where
        ``policy`` allows (a :class:`DownloadError` otherwise, before any connection).
        Redirects are not followed, so that the caller can check every hop. The URL is sent
        exactly as given (``encoded=True``): re-quoting a signed URL would break its
        signature. ``stall_timeout`` bounds each wait for more of the body.
        """
        shown = redact_url(url)
        target = yarl.URL(url, encoded=True)
        host = target.host or ""
        try:
            policy.check_host(host)
        except AddressRefused as literal:
            raise DownloadError(f"refusing to download {shown}: {literal}", url=shown) from None
        session, resolver = self._file_session(policy)
        proxy, proxy_auth = self._proxies.for_url(target)
        if proxy is not None:
            await self._check_for_proxy(resolver, host, shown)
        timeout = None
        if stall_timeout is not None:
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self.timeouts.connect,
                sock_connect=self.timeouts.connect,
                sock_read=stall_timeout,
            )
        failure: Exception | None = None
        debug = log.isEnabledFor(logging.DEBUG)
        started = time.perf_counter() if debug else 0.0
        self.file_requests += 1
        try:
            response = await session.get(
                target,
                allow_redirects=False,
                headers={"Accept": "*/*"},
                timeout=timeout,
                proxy=proxy,
                proxy_auth=proxy_auth,
            )
        except aiohttp.InvalidURL as exc:
            # A verdict on the URL itself (e.g. a host no resolver may be asked): no retry.
            failure = DownloadError(
                f"refusing to download {shown}: not a usable URL ({describe(exc)})", url=shown
            )
        except _CONNECT_ERRORS as exc:
            refused = _refusal(exc)
            if refused is not None:
                failure = DownloadError(f"refusing to download {shown}: {refused}", url=shown)
            else:
                failure = TransportError(
                    f"GET {shown}: could not connect ({describe(exc)})",
                    request_sent=False,
                    host=host,
                )
        except _OTHER_ERRORS as exc:
            failure = TransportError(
                f"GET {shown}: no answer ({describe(exc)})", request_sent=True, host=host
            )
        if failure is not None:
            if debug:
                log.debug(
                    "GET %s -> failed: %s; %.0f ms",
                    shown,
                    failure,
                    (time.perf_counter() - started) * 1000,
                )
            raise failure
        try:
            if debug:
                log.debug(
                    "GET %s -> HTTP %s; %.0f ms to the headers",
                    shown,
                    response.status,
                    (time.perf_counter() - started) * 1000,
                )
            yield ByteStream(response, shown)
        finally:
            if response.content.at_eof():
                response.release()  # read to the end: the connection can serve the next file
            else:
                # Dropping a connection whose body was not read to the end beats draining the
                # rest of a file nobody wants.
                response.close()

    async def _check_for_proxy(self, resolver: _GuardedResolver, host: str, shown: str) -> None:
        """The address rule for a download a proxy will make: the proxy connects, so the
        name is checked on the addresses it resolves to here (see the module docstring)."""
        failure: DownloadError | None = None
        try:
            await resolver.check(host)
        except AddressRefused as refused:
            failure = DownloadError(f"refusing to download {shown}: {refused}", url=shown)
        except OSError as exc:
            failure = DownloadError(
                f"refusing to download {shown} through the proxy: {host!r} does not resolve "
                f"here ({exc.strerror or type(exc).__name__}), so its addresses cannot be "
                "checked; list it in allowed_hosts to trust it",
                url=shown,
            )
        if failure is not None:
            raise failure
