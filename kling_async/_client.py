"""KlingClient: the scope that owns the session, the credentials and the account's limits."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import anyio
import anyio.abc
import attrs

from kling_async._errors import KlingError, ValidationError
from kling_async.engine.jobs import EventHub, Job, JobEvent, as_completed
from kling_async.engine.limits import AdaptiveLimit, RequestBudget
from kling_async.engine.pollers import PollerPool
from kling_async.engine.submitter import Submitter
from kling_async.http.addresses import AddressPolicy
from kling_async.http.caller import Api
from kling_async.http.create import CreateSettings
from kling_async.http.download import (
    DEFAULT_DOWNLOAD_TIMEOUT,
    DEFAULT_MAX_BYTES,
    DownloadResult,
    check_allowed_hosts,
    download_video,
)
from kling_async.http.health import Health
from kling_async.http.resources import Text2VideoResource
from kling_async.http.transport import HttpTransport, Timeouts, redact_url
from kling_async.protocol.auth import ENV_BASE_URL, auth_from
from kling_async.protocol.models import Task, Text2VideoRequest
from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.profiles import COMETAPI, OFFICIAL, BackendProfile, ExternalIdLookup
from kling_async.protocol.retry import RetryPolicy

__all__ = ["COMETAPI_BASE_URL", "OFFICIAL_BASE_URL", "ClientStats", "KlingClient"]

COMETAPI_BASE_URL = "https://api.cometapi.com/kling"
OFFICIAL_BASE_URL = "https://api-singapore.klingai.com"

_TEXT2VIDEO_PATH = "/v1/videos/text2video"
_LOOKUP_FORMS = ("query", "path", "path_flag")


@attrs.frozen(kw_only=True)
class ClientStats:
    """Counters of one client's life, for dashboards and benchmarks."""

    requests: int  # every HTTP request sent (creates, polls, lookups, list sweeps, retries)
    polls: int  # single-task polls by the poller pool
    sweeps: int  # list sweeps by the poller pool
    submitted: int  # tasks created by the submitter
    rejected: int  # jobs that ended without a task (refused, ambiguous, unreachable)
    concurrency_limited: int  # 1303 answers the submitter met
    queued: int  # jobs waiting to be submitted
    active: int  # Kling slots held: creates in flight and tasks not yet ended
    active_limit: float  # the slot limit as learned so far (inf while unknown)
    peak_active: int
    following: int  # tasks the pollers follow
    retries_refused: int = 0  # retries the client-wide retry budget did not allow
    #: While the API host refuses every connect: what the last attempt said, and for how
    #: many seconds it has been so (None and 0.0 once a request gets through).
    connection_error: str | None = None
    connection_failing_for: float = 0.0


def _check_count(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError(name, value, "must be a whole number >= 1")


class KlingClient:
    """An ``async with`` scope for one Kling account.

    Pass ``api_key`` for CometAPI (the default base URL), or ``access_key`` and ``secret_key`` for
    Kling's official API; with none, the ``KLING_API_KEY`` or ``KLING_ACCESS_KEY`` +
    ``KLING_SECRET_KEY`` environment variables are read, and ``KLING_BASE_URL`` overrides the
    default base URL. ``base_url`` is the prefix before ``/v1/...``.

    The backend profile (limits, list support) follows the auth mode, whatever the host;
    ``profile=`` overrides it. ``timeout`` bounds each read of an answer and ``connect_timeout``
    each connect, in seconds. ``settle_window`` is how long an ambiguous create keeps looking
    for its task before re-sending.

    Many jobs: :meth:`submit` queues a job behind the account's limits. ``max_active_tasks``
    caps Kling slots held at once (None: unknown, learned from 1303 answers; a lower real limit
    is learned too); ``max_concurrent_submits`` caps create POSTs in flight;
    ``max_requests_per_second`` caps every request of the client (polls and creates share it);
    ``poll`` shapes polling and ``pollers`` is the number of poller coroutines. ``list_sweep``
    lets one list request stand in for many polls where the backend has the list endpoint
    (default: on where the profile says it has one, so off for CometAPI).

    ``unreachable_after``: once every connect to the API host has failed for this many
    seconds with no answer in between, the work waiting on it ends with
    :class:`UnreachableError` (queued jobs, followed jobs, retrying calls) instead of
    retrying on (None: never give up). ``ssl`` is the TLS context for every connection
    (default: the system's trust store).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        base_url: str | None = None,
        profile: BackendProfile | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        settle_window: float = 5.0,
        external_id_lookup: ExternalIdLookup | Literal["profile"] | None = "profile",
        max_connections: int = 100,
        max_active_tasks: int | None = None,
        max_concurrent_submits: int = 4,
        max_requests_per_second: float | None = 20.0,
        pollers: int = 4,
        list_sweep: bool | None = None,
        unreachable_after: float | None = 30.0,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self._auth = auth_from(api_key=api_key, access_key=access_key, secret_key=secret_key)
        default_profile = COMETAPI if self._auth.kind == "bearer" else OFFICIAL
        self.profile = profile if profile is not None else default_profile
        if base_url is None:
            base_url = os.environ.get(ENV_BASE_URL) or (
                COMETAPI_BASE_URL if self._auth.kind == "bearer" else OFFICIAL_BASE_URL
            )
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValidationError("base_url", base_url, "must be an http:// or https:// URL")
        if external_id_lookup == "profile":
            external_id_lookup = self.profile.external_id_lookup
        if external_id_lookup is not None and external_id_lookup not in _LOOKUP_FORMS:
            raise ValidationError(
                "external_id_lookup", external_id_lookup, f"must be one of {_LOOKUP_FORMS} or None"
            )
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not isinstance(value, int | float) or not value > 0:
                raise ValidationError(name, value, "must be a number of seconds > 0")
        if unreachable_after is not None and (
            not isinstance(unreachable_after, int | float) or not 0 < unreachable_after < 1e9
        ):
            raise ValidationError(
                "unreachable_after", unreachable_after, "must be a number of seconds > 0, or None"
            )
        if not isinstance(settle_window, int | float) or settle_window < 0:
            raise ValidationError(
                "settle_window", settle_window, "must be a number of seconds >= 0"
            )
        _check_count("max_active_tasks", max_active_tasks, optional=True)
        _check_count("max_concurrent_submits", max_concurrent_submits)
        _check_count("pollers", pollers)
        _check_count("max_connections", max_connections)
        if max_requests_per_second is not None and not (
            isinstance(max_requests_per_second, int | float) and max_requests_per_second > 0
        ):
            raise ValidationError(
                "max_requests_per_second", max_requests_per_second, "must be > 0, or None"
            )
        self.base_url = base_url.rstrip("/")
        self.unreachable_after = unreachable_after
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._transport = HttpTransport(
            self.base_url,
            timeouts=Timeouts(connect=connect_timeout, read=timeout),
            max_connections=max_connections,
            ssl_context=ssl,
        )
        self._budget = RequestBudget(max_requests_per_second)
        self._health = Health(self._transport.host, unreachable_after=unreachable_after)
        self._api = Api(
            self._transport,
            self._auth,
            retry=self.retry,
            before_request=self._budget.acquire,
            on_rate_limited=self._rate_limited,
            health=self._health,
        )
        lookup = external_id_lookup
        self.text2video = Text2VideoResource(
            self._api,
            _TEXT2VIDEO_PATH,
            profile=self.profile,
            create_settings=CreateSettings(retry=self.retry, settle_window=settle_window),
            poll=self.poll,
            external_id_lookup=lookup,
        )
        self._hub = EventHub()
        # A probe at least every 20 max intervals (20 minutes by default) while jobs wait.
        self._limit = AdaptiveLimit(max_active_tasks, probe_period=20 * self.poll.max_interval)
        self._submitter = Submitter(
            self.text2video,
            self._limit,
            self._budget,
            retry=self.retry,
            settle_window=settle_window,
            health=self._health,
            on_submitted=self._submitted,
        )
        self._pool = PollerPool(
            self.text2video,
            self.poll,
            on_end=self._ended,
            list_sweep=self.profile.supports_list if list_sweep is None else list_sweep,
        )
        self._workers = (max_concurrent_submits, pollers)
        self._stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._entered = False

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise KlingError("a KlingClient can be entered once; make a new one")
        self._entered = True
        async with AsyncExitStack() as stack:
            await self._transport.open()
            stack.push_async_callback(self._transport.aclose)
            stack.callback(self._hub.close)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            submitters, pollers = self._workers
            self._task_group.start_soon(self._submitter.run, submitters, name="kling-submitters")
            self._task_group.start_soon(self._pool.run, pollers, name="kling-poll-dispatcher")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop all background work, end every iterator and close the session.

        Jobs keep their ``task_id``: tasks go on server-side and can be followed again with
        :meth:`track` by a new client. Safe to call more than once.
        """
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        self._task_group = None
        await stack.aclose()

    @property
    def host(self) -> str:
        """The API's host name (where result files may always be fetched from)."""
        return self._transport.host

    def _running(self) -> None:
        if self._stack is None:
            raise KlingError(
                "the client is not running: use it inside `async with KlingClient(...) as kling`"
            )

    # --- many jobs --------------------------------------------------------------------------

    def submit(self, request: Text2VideoRequest, *, resume: bool = False) -> Job:
        """Queue one text-to-video job behind the client's limits and return it at once.

        The request is validated now (a :class:`ValidationError` is raised here, before any
        network call) and given an ``external_task_id`` if it has none. ``resume=True`` says
        an earlier run may already have sent this request (same ``external_task_id``): the
        task is looked up first and created only if it does not exist.
        """
        return self.submit_many([request], resume=resume)[0]

    def submit_many(
        self, requests: Iterable[Text2VideoRequest], *, resume: bool = False
    ) -> list[Job]:
        """Queue many jobs; all are validated before any is queued."""
        self._running()
        prepared = [self.text2video.prepare(request) for request in requests]
        jobs = []
        for request in prepared:
            job = Job(
                self._hub,
                request=request,
                external_task_id=request.external_task_id,
                class_key=(
                    request.effective_model,
                    request.effective_mode,
                    request.effective_duration,
                ),
            )
            self._submitter.enqueue(job, resume=resume)
            jobs.append(job)
        return jobs

    def track(self, task_id: str) -> Job:
        """A job following a task created elsewhere or earlier (for example before a restart).

        Tracking the same task twice gives the same job. A tracked task counts against
        ``max_active_tasks`` until it ends, since it holds one of the account's slots.
        """
        self._running()
        if not isinstance(task_id, str) or not task_id:
            raise ValidationError("task_id", task_id, "must be a non-empty string")
        existing = self._pool.following.get(task_id)
        if existing is not None:
            return existing
        job = Job(self._hub, task_id=task_id)
        job.started_at = time.monotonic()
        self._limit.hold()
        self._pool.follow(job, poll_now=True)
        return job

    def as_completed(self, jobs: Iterable[Job]) -> AsyncIterator[Job]:
        """Yield the jobs as they end (succeeded, failed or errored), first finished first."""
        return as_completed(self._hub, jobs)

    def events(self) -> AsyncIterator[JobEvent]:
        """Every status change of every job from now on, until the client closes."""
        return self._hub.events()

    @property
    def stats(self) -> ClientStats:
        return ClientStats(
            requests=self._budget.requests,
            polls=self._pool.polls,
            sweeps=self._pool.sweeps,
            submitted=self._submitter.stats.submitted,
            rejected=self._submitter.stats.rejected,
            concurrency_limited=self._limit.throttled,
            queued=self._submitter.queued,
            active=self._limit.active,
            active_limit=self._limit.limit,
            peak_active=self._limit.peak_active,
            following=len(self._pool.following),
            retries_refused=self._api.budget.refused if self._api.budget is not None else 0,
            connection_error=self._health.connect_error,
            connection_failing_for=self._health.failing_for,
        )

    # --- engine callbacks -------------------------------------------------------------------

    def _submitted(self, job: Job, task: Task, sent_at: float) -> None:
        job.started_at = sent_at
        job.measured = True
        job._observe(task)
        if job.done:
            self._ended(job)
        else:
            self._pool.follow(job)

    def _ended(self, job: Job) -> None:
        self._limit.release()

    def _rate_limited(self, retry_after: float | None) -> None:
        self._budget.pause(self.retry.delay(1, retry_after=retry_after, throttled=True))

    def __repr__(self) -> str:
        return (
            f"KlingClient(base_url={redact_url(self.base_url)!r}, "
            f"profile={self.profile.name!r}, auth={self._auth.kind!r})"
        )

    # --- result files -----------------------------------------------------------------------

    async def download(
        self,
        task: Task | str,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        allowed_hosts: Iterable[str] | None = None,
        allow_private: bool = False,
        timeout: float | None = DEFAULT_DOWNLOAD_TIMEOUT,  # noqa: ASYNC109 (a public budget)
        stall_timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> DownloadResult:
        """Download a finished task's video to ``path``, atomically, and return its SHA-256.

        ``task`` is a :class:`Task` (its first video is fetched) or a task id (the task is
        fetched first). The file is streamed to a temporary file beside ``path``, synced and
        renamed into place, so ``path`` never holds a partial file; parent directories are
        created. Only ``http``/``https`` URLs are fetched, never with the API credentials.

        Result URLs come from the network, so by default the download connects only to the
        API's own host (any port) or to hosts whose addresses are all public, checked on the
        address connected and on every redirect: never loopback, private, link-local and
        the like, in any spelling. ``allowed_hosts`` names hosts to trust whatever their
        addresses (``".example.com"`` covers its subdomains too); ``allow_private=True``
        drops the address rule. A body that is not a video (HTML, JSON or text, or no MP4
        ``ftyp`` box at its start) is refused and nothing is written; so is a file over
        ``max_bytes``. ``timeout`` bounds the whole download in seconds, retries included,
        and ``stall_timeout`` each wait for more of the body (default: the client's read
        timeout). Failures a retry can fix are retried with ``retry`` (default: the client's
        policy); an expired URL (403/404/410) makes it fetch the task again for a fresh one.

        Raises :class:`DownloadError` (a refusal names the host and the rule; nothing is
        connected to), the :class:`KlingError` of a failed task fetch, or :class:`OSError`
        when the file cannot be written.
        """
        self._running()
        allowed = check_allowed_hosts(allowed_hosts) or frozenset()
        if not isinstance(allow_private, bool):
            raise ValidationError("allow_private", allow_private, "must be True or False")
        policy = AddressPolicy.build(self._transport.host, allowed, allow_private=allow_private)
        if isinstance(task, str):
            task = await self.text2video.get(task)
        elif not isinstance(task, Task):
            raise ValidationError("task", task, "must be a Task or a task id")
        return await download_video(
            self._transport,
            self.text2video.get,
            task,
            Path(path),
            policy=policy,
            max_bytes=max_bytes,
            timeout=timeout,
            stall_timeout=stall_timeout,
            retry=retry or self.retry,
        )
