"""The exception tree, and the table that maps Kling's error codes onto it.

Everything the SDK raises on purpose is a :class:`KlingError`::

    KlingError
    ├── ValidationError            bad input, raised before any network call (also a ValueError)
    ├── UsageError                 the SDK used the wrong way: a client not entered, entered
    │                                twice or closed; both credential kinds at once
    ├── APIError                   the server answered with an error code
    │   ├── AuthenticationError        1000-1004, a gateway 401: check the key
    │   ├── AccountError               1100-1103, 1304: fatal for the account, never retried
    │   ├── InvalidRequestError        1200-1203: the request itself is wrong
    │   │   └── TaskNotFoundError          no such task (1201/1203/task_not_exist on a query)
    │   ├── PolicyError                1300, 1301: refused by content policy
    │   ├── ThrottledError             429s that mean "later", not "never"
    │   │   ├── RateLimitError             1302: requests too fast
    │   │   └── ConcurrencyLimitError      1303: too many tasks running for the account
    │   └── ServerError                5000-5002 and other 5xx
    ├── TransportError             no usable HTTP answer (connect failed, timeout, dropped)
    │   └── UnreachableError           the API host could not be reached for a while: gave up
    ├── ResponseDecodeError        an answer that is not the JSON envelope (HTML, empty, truncated)
    │   └── IgnoredLookupError         a lookup by external_task_id answered with a list or with
    │                                    another task: the backend may ignore it (not "not found")
    ├── DownloadError              a result file could not be fetched, or was refused
    │   └── AddressRefused             a download would connect where the address policy forbids
    │                                    (also an OSError, to travel through aiohttp's resolver)
    ├── TaskFailedError            the task ran and ended "failed" (carries the task)
    ├── WaitTimeoutError           a wait ran out of time (also a TimeoutError)
    ├── AmbiguousSubmissionError   a create may or may not have happened (carries external_task_id)
    ├── ClientClosedError          the client closed before the job ended (the task goes on)
    ├── RestoredError              a job loaded from a store ended with this (type name, message)
    └── JobStoreError              a job store cannot be used (unreadable, or a newer layout)

Warnings, issued (``warnings.warn``), never raised::

    UserWarning
    └── UnknownModelWarning        a model_name this SDK does not know; it is sent anyway

Exceptions carry the request context (HTTP status, request id, code) so that a log line is
enough to ask Kling's support about it, and never a key, secret or token.

Private control-flow signals that never reach a caller stay beside the loop that uses them:
``LandedUnseen`` (``http.create``, caught by the engine's submitter), ``_Expired`` and
``_Retryable`` (``http.download``, turned into a fresh URL, a retry or a DownloadError).

This module imports nothing of the SDK: the task an error carries is described by the small
:class:`TaskSnapshot` protocol, so the models can import the errors without a cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "APIError",
    "AccountError",
    "AddressRefused",
    "AmbiguousSubmissionError",
    "AuthenticationError",
    "ClientClosedError",
    "ConcurrencyLimitError",
    "DownloadError",
    "IgnoredLookupError",
    "InvalidRequestError",
    "JobStoreError",
    "RestoredError",
    "KlingError",
    "PolicyError",
    "RateLimitError",
    "ResponseDecodeError",
    "ServerError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskSnapshot",
    "ThrottledError",
    "TransportError",
    "UnknownModelWarning",
    "UnreachableError",
    "UsageError",
    "ValidationError",
    "WaitTimeoutError",
    "Redactor",
    "api_error_class",
    "redact_url",
    "short_repr",
]

_SNIPPET = 200


class _Status(Protocol):
    @property
    def value(self) -> str: ...


class TaskSnapshot(Protocol):
    """What an error reads of the task it carries (``kling_async.Task`` is one)."""

    @property
    def task_id(self) -> str: ...

    @property
    def status(self) -> _Status: ...

    @property
    def status_message(self) -> str: ...


#: The task type an error carries: ``Task`` for text-to-video, another family's task later.
TaskT = TypeVar("TaskT", bound=TaskSnapshot)


def short_repr(value: object, limit: int = 80) -> str:
    """repr() cut to `limit` characters, so one huge prompt does not flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def snippet(body: bytes | str, limit: int = _SNIPPET) -> str:
    """The start of a response body, decoded leniently, for error messages."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


#: Any bearer credential, known to us or not (an old JWT, a key a proxy added).
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_MIN_SECRET = 4


class Redactor:
    """Replaces every secret of a client (keys, secrets, the tokens minted from them) and any
    ``Bearer <token>`` with ``***`` in text that came from outside.

    A server may echo the request (its ``Authorization`` header included) into an error
    message, a request id or a body; that text must be cleaned before it enters a message,
    and before it is cut to a snippet (a cut could leave half a key). ``secrets`` is called
    each time, because a JWT client mints new tokens as it goes; the pattern is rebuilt only
    when the set changes.
    """

    def __init__(self, secrets: Callable[[], Iterable[str]]) -> None:
        self._secrets = secrets
        self._known: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None

    def __call__(self, text: str) -> str:
        current = frozenset(s for s in self._secrets() if len(s) >= _MIN_SECRET)
        if current != self._known:
            self._known = current
            ordered = sorted(current, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        if self._pattern is not None:
            text = self._pattern.sub("***", text)
        return _BEARER.sub(r"\1***", text)


def no_redaction(text: str) -> str:
    return text


def redact_url(url: str) -> str:
    """``scheme://host/path`` of a URL: no user info, no query (result URLs are signed, and a
    signature is a capability that does not belong in logs or messages)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class KlingError(Exception):
    """Base of every error this SDK raises on purpose."""


class ValidationError(KlingError, ValueError):
    """A request value breaks a rule; raised before anything is sent.

    ``field`` is the dotted field name (``camera_control.config.zoom``), ``value`` the offending
    value and ``rule`` the rule it breaks, in words.
    """

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field}={short_repr(value)} is invalid: {rule}")


class UsageError(KlingError):
    """The SDK was used in a way it cannot work: a client used outside its ``async with``,
    entered twice or after closing, or given both credential kinds. A bug in the calling
    code, not a condition to retry; the message says what to do instead."""


class JobStoreError(KlingError):
    """A job store cannot be used: its file is not a store, cannot be read or written, or was
    written by a newer layout than this version reads. The message names the file and says
    what to do; a store's records never hold a secret, so neither does the message."""


class APIError(KlingError):
    """The server answered with an error code.

    ``code`` is Kling's integer code (or a gateway's string code such as ``"model_not_found"``),
    ``http_status`` the HTTP status and ``request_id`` the id to quote to support (may be None:
    CometAPI does not always send one).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | str | None,
        http_status: int,
        request_id: str | None = None,
        body: str = "",
    ) -> None:
        self.message = message
        self.code = code
        self.http_status = http_status
        self.request_id = request_id
        self.body = body
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [f"HTTP {self.http_status}"]
        if self.code is not None:
            parts.append(f"code {self.code}")
        if self.request_id:
            parts.append(f"request_id {self.request_id}")
        hint = self.hint()
        text = f"{self.message or 'no message'} ({', '.join(parts)})"
        return f"{text}: {hint}" if hint else text

    def hint(self) -> str:
        """What the caller can do about it, in one phrase."""
        return ""


class AuthenticationError(APIError):
    """The credentials were refused (codes 1000-1004, a gateway's 401): a wrong or revoked
    key, or a JWT the server would not take. Expired JWTs are minted again and retried once
    before this is raised."""

    def hint(self) -> str:
        return "check the API key, or the access key and secret key, and the base URL"


class AccountError(APIError):
    """Fatal for the whole account (arrears, no resource pack, no permission, IP whitelist).

    Retrying cannot help, even though Kling sends some of these as HTTP 429.
    """

    def hint(self) -> str:
        return "the account cannot create tasks now; fix it in the Kling or CometAPI console"


class InvalidRequestError(APIError):
    """The server refused the request itself (codes 1200-1203); the message names the field.
    Sending it again cannot help."""

    def hint(self) -> str:
        return "the server rejected the request; see the message for the field"


class TaskNotFoundError(InvalidRequestError):
    """No task with that id (task id or external_task_id) exists for this account."""

    def hint(self) -> str:
        return "no task with that id exists for this account"


class PolicyError(APIError):
    """The prompt or output was refused by the platform's content policy."""

    def hint(self) -> str:
        return "the content was refused by policy; change the prompt"


class ThrottledError(APIError):
    """A 429 that means "later": the SDK retries these itself within its budget.

    ``retry_after`` is the server's Retry-After in seconds, if it sent one.
    """

    retry_after: float | None = None


class RateLimitError(ThrottledError):
    """Requests too fast (code 1302). Every request of the client pauses, then it retries."""

    def hint(self) -> str:
        return "too many requests per second; lower max_requests_per_second"


class ConcurrencyLimitError(ThrottledError):
    """Too many tasks running for the account (code 1303); no task was created. The engine
    lowers its slot limit and waits for a running task to end before it sends again."""

    def hint(self) -> str:
        return "too many tasks running for the account; wait for one to finish"


class ServerError(APIError):
    """The server failed (codes 5000-5002 and other 5xx). Reads are retried; a create that
    met one may have created its task, so it is looked up before anything is sent again."""

    def hint(self) -> str:
        return "the server failed; retrying later usually helps"


class TransportError(KlingError):
    """No usable HTTP answer: connect failure, timeout or a dropped connection.

    ``request_sent`` is False only when the request provably never left (connect refused, DNS,
    TLS handshake, connect timeout): only then is re-sending a create safe without a lookup.
    ``host`` is the host it was for and ``reason`` the failure in a few words ("connection
    refused", "DNS lookup failed (...)", "TLS handshake failed", "connect timed out"). The
    library's own exception is never kept as the cause: aiohttp's errors carry the request's
    headers, the ``Authorization`` header among them.
    """

    def __init__(
        self,
        message: str,
        *,
        request_sent: bool,
        host: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.request_sent = request_sent
        self.host = host
        self.reason = reason
        super().__init__(message)


class UnreachableError(TransportError):
    """The API host could not be reached for ``seconds`` seconds in a row (connections refused,
    DNS or TLS failures, connect timeouts) with no request getting through in between.

    Raised for the work that waited on it: queued jobs end with it (nothing was sent for them)
    and followed jobs end with it too (their ``task_id`` is kept: ``track`` them later).
    """

    def __init__(self, host: str, seconds: float, last: str) -> None:
        self.seconds = seconds
        super().__init__(
            f"cannot reach {host}: {last}, for {seconds:.0f} s; check the base URL, the network "
            "and any proxy",
            request_sent=False,
            host=host,
            reason=last,
        )


class ResponseDecodeError(KlingError):
    """The server answered, but not with the JSON envelope (HTML, empty, truncated, wrong shape)."""

    def __init__(
        self, message: str, *, http_status: int, body: str = "", request_id: str | None = None
    ) -> None:
        self.http_status = http_status
        self.body = body
        self.request_id = request_id
        detail = (
            f" (HTTP {http_status}; body starts: {body!r})" if body else f" (HTTP {http_status})"
        )
        super().__init__(message + detail)


class IgnoredLookupError(ResponseDecodeError):
    """A lookup by ``external_task_id`` was answered with a list page, or with another task: the
    backend may ignore the parameter, so the answer says nothing about our task. Never read as
    "not found" (that would re-send a create that may have landed)."""


class DownloadError(KlingError):
    """A result file could not be downloaded, or was refused (scheme, host or address, size,
    content that is not a video, deadline).

    ``url`` is the URL without its query string (signatures stay out of messages) and
    ``http_status`` the last HTTP status seen, if any.
    """

    def __init__(self, message: str, *, url: str = "", http_status: int | None = None) -> None:
        self.url = url
        self.http_status = http_status
        super().__init__(message)


class AddressRefused(DownloadError, OSError):
    """A download would connect where the address policy forbids (a private, loopback or
    otherwise non-public address, in any spelling). ``host`` is the host and ``rule`` why.

    Also an ``OSError``, so that it travels through aiohttp's resolver call like a failed DNS
    lookup, with no connection made; the transport reports it as a :class:`DownloadError`
    naming the URL, and a caller that catches ``DownloadError`` catches this too.
    """

    def __init__(self, host: str, rule: str) -> None:
        super().__init__(f"host {host!r} {rule}")
        self.host = host
        self.rule = rule


class TaskFailedError(KlingError, Generic[TaskT]):
    """The task ran and ended ``failed``; ``task`` is its final snapshot (a ``Task``)."""

    def __init__(self, task: TaskT) -> None:
        self.task = task
        reason = task.status_message or "no reason given"
        super().__init__(f"task {task.task_id} failed: {reason}")


class WaitTimeoutError(KlingError, TimeoutError, Generic[TaskT]):
    """A wait ran out of time before the task ended; the task goes on server-side.

    ``task`` is the last snapshot seen (a ``Task``; None if none was fetched).
    """

    def __init__(self, task_id: str, timeout: float, task: TaskT | None = None) -> None:
        self.task_id = task_id
        self.timeout = timeout
        self.task = task
        last = f"; last status {task.status.value}" if task is not None else ""
        super().__init__(
            f"task {task_id} did not end within {timeout:g} s{last}; it is still running "
            "server-side: wait again or track it later"
        )


class AmbiguousSubmissionError(KlingError):
    """A create may or may not have created a task, and the SDK could not find out.

    Resubmitting blindly could bill the clip twice; query ``external_task_id`` later instead.
    """

    def __init__(self, external_task_id: str, cause: BaseException | None = None) -> None:
        self.external_task_id = external_task_id
        self.cause = cause
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(
            f"the create for external_task_id={external_task_id!r} may or may not have reached "
            f"the server{why}; look it up by external_task_id before resubmitting"
        )


# --- code table (protocol section 4) -------------------------------------------------------

_CODE_CLASSES: dict[int, type[APIError]] = {
    **dict.fromkeys((1000, 1001, 1002, 1003, 1004), AuthenticationError),
    **dict.fromkeys((1100, 1101, 1102, 1103, 1304), AccountError),
    **dict.fromkeys((1200, 1201, 1202, 1203), InvalidRequestError),
    **dict.fromkeys((1300, 1301), PolicyError),
    1302: RateLimitError,
    1303: ConcurrencyLimitError,
    **dict.fromkeys((5000, 5001, 5002), ServerError),
}

#: Codes that mean "this task does not exist" when answering a single-task query.
NOT_FOUND_CODES: frozenset[int | str] = frozenset({1201, 1203, "task_not_exist"})

_GATEWAY_CODES: dict[str, type[APIError]] = {
    "model_not_found": InvalidRequestError,
    "task_not_exist": TaskNotFoundError,
    "invalid_request": InvalidRequestError,
    "rate_limit_exceeded": RateLimitError,
    "insufficient_quota": AccountError,
    "invalid_api_key": AuthenticationError,
}


def _class_for_status(http_status: int) -> type[APIError]:
    if http_status == 401:
        return AuthenticationError
    if http_status == 403:
        return AccountError
    if http_status == 429:
        return RateLimitError
    if http_status >= 500:
        return ServerError
    if 400 <= http_status < 500:
        return InvalidRequestError
    return APIError


def api_error_class(code: Any, http_status: int, *, query: bool = False) -> type[APIError]:
    """The exception class for a code and HTTP status.

    ``query`` marks a single-task query, where the "not found" codes mean
    :class:`TaskNotFoundError` (protocol 1.1: servers disagree on which code they use).
    """
    if not isinstance(code, int | str) or isinstance(code, bool):
        return _class_for_status(http_status)
    if query and code in NOT_FOUND_CODES:
        return TaskNotFoundError
    if isinstance(code, int) and code in _CODE_CLASSES:
        return _CODE_CLASSES[code]
    if isinstance(code, str) and code in _GATEWAY_CODES:
        gateway_cls = _GATEWAY_CODES[code]
        if gateway_cls is TaskNotFoundError and not query:
            return InvalidRequestError
        if gateway_cls is InvalidRequestError and http_status >= 500 and code != "model_not_found":
            # CometAPI has answered missing fields with HTTP 500 invalid_request, and upstream
            # failures with the same envelope: a 5xx stays a server-side failure to us.
            return ServerError
        return gateway_cls
    return _class_for_status(http_status)


class ClientClosedError(KlingError):
    """The client closed before the job ended. The task goes on server-side: ``track`` it."""


class UnknownModelWarning(UserWarning):
    """A ``model_name`` this SDK does not know; it is sent anyway (new models appear often)."""


class RestoredError(KlingError):
    """The error a job ended with before a restart, as its job store kept it: the original
    class name (``error_type``) and message, since the exception itself is not stored."""

    def __init__(self, error_type: str | None, message: str) -> None:
        self.error_type = error_type or "KlingError"
        self.message = message
        super().__init__(f"{self.error_type}: {message}")
