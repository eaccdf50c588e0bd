"""KlingClient: the scope that wires one account's engine: session, credentials, limits, jobs."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import anyio
import anyio.abc
import attrs

from kling_async._errors import UsageError, ValidationError
from kling_async.engine.account import (
    Account,
    AccountBinding,
    AccountSettings,
)
from kling_async.engine.durations import (
    DurationKeeper,
    DurationStats,
    DurationStore,
    LearnedDurations,
)
from kling_async.engine.jobs import EventHub, Job, JobEvent, JobStatus, as_completed
from kling_async.engine.limits import AdaptiveLimit, RequestBudget, RequestLimiter, SlotLimiter
from kling_async.engine.pollers import PollerPool
from kling_async.engine.sqlite_store import SQLiteJobStore
from kling_async.engine.store import JobRecord, JobStore, StoreWriter
from kling_async.engine.submitter import Submitter
from kling_async.engine.tracker import Tracker
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
from kling_async.protocol.account import COMETAPI_BASE_URL, OFFICIAL_BASE_URL, resolve_account
from kling_async.protocol.models import Task, Text2VideoRequest
from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.profiles import BackendProfile, ExternalIdLookup
from kling_async.protocol.retry import RetryPolicy

__all__ = ["COMETAPI_BASE_URL", "OFFICIAL_BASE_URL", "ClientStats", "KlingClient"]

_LOOKUP_FORMS = ("query", "path", "path_flag")


@attrs.frozen(kw_only=True)
class ClientStats:
    """Counters of one client's life, for dashboards and benchmarks."""

    requests: int  #: every HTTP request sent: api_requests + file_requests
    polls: int  #: single-task polls by the poller pool
    sweeps: int  #: list sweeps by the poller pool
    submitted: int  #: tasks created by the submitter
    rejected: int  #: jobs that ended without a task (refused, ambiguous, unreachable)
    concurrency_limited: int  #: 1303 answers the submitter met (slot probes' included)
    queued: int  #: jobs waiting to be submitted
    active: int  #: Kling slots held: creates in flight and tasks not yet ended
    active_limit: float  #: the slot limit as learned so far (inf while unknown)
    peak_active: int  #: the most Kling slots held at once so far
    following: int  #: tasks the pollers follow
    #: API requests sent (creates, polls, lookups, list sweeps, every retry).
    api_requests: int = 0
    file_requests: int = 0  #: requests for result files (each redirect hop and retry counted)
    retries_refused: int = 0  #: retries the client-wide retry budget did not allow
    #: Creates sent past the limit while jobs waited (``PollPolicy.probe_interval``).
    slot_probes: int = 0
    slot_probes_refused: int = 0  #: slot probes the account refused (1303: nothing created)
    #: While the API host refuses every connect: what the last attempt said (None once a
    #: request gets through).
    connection_error: str | None = None
    #: For how many seconds every connect has failed (0.0 once a request gets through).
    connection_failing_for: float = 0.0


def _job_store(store: object) -> tuple[JobStore | None, bool]:
    """The store a ``store=`` argument means, and whether the client owns (closes) it."""
    if store is None:
        return None, False
    if isinstance(store, str | os.PathLike):
        if not str(store):
            raise ValidationError("store", store, "must be a file path or a JobStore")
        return SQLiteJobStore(store), True
    if not isinstance(store, JobStore):
        raise ValidationError("store", store, "must be a file path or a JobStore")
    return store, False


def _callback_secrets(callback_url: str | None) -> tuple[str, ...]:
    """The callback URL, and its last path segment where that looks like a token (22 or more
    of ``A-Za-z0-9_-``): a plain word such as ``callback`` is no secret to hide."""
    if callback_url is None:
        return ()
    last = callback_url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    token = re.fullmatch(r"[A-Za-z0-9_-]{22,}", last) is not None
    return (callback_url, last) if token else (callback_url,)


def _fingerprint(base_url: str, credential: str) -> str:
    """Names an account without holding its key: 16 hex digits of a SHA-256 of the base URL
    and the key's first part (the API key, or the access key), never the key itself."""
    digest = hashlib.sha256(f"{base_url}\0{credential}".encode()).hexdigest()
    return digest[:16]


class _Member:
    """The client as its shared account's binding sees it (:class:`AccountMember`)."""

    def __init__(self, client: KlingClient) -> None:
        self._client = client

    def replicate(self, records: Sequence[JobRecord]) -> None:
        for record in records:
            self._client._tracker.replicate(record)

    def adopt(self, records: Sequence[JobRecord]) -> None:
        client = self._client
        for record in records:
            job = client._tracker.adopt(record)
            if job.done or client._tracker.following.get(job.task_id or "") is job:
                continue
            if job.task_id is not None:
                client._tracker.track(job.task_id, job=job)
            elif job.request is not None:
                client._submitter.enqueue(job, resume=client._tracker.entry(job).sent)

    def disown(self, job_ids: Iterable[str]) -> None:
        tracker = self._client._tracker
        for job_id in job_ids:
            job = tracker.jobs.get(job_id)
            if job is not None:
                tracker.disown(job)

    def hint(self, task: Task) -> None:
        tracker = self._client._tracker
        job = tracker.by_task.get(task.task_id)
        if job is not None and not tracker.entry(job).replica:
            tracker.observe(task, confirmed=False)

    def stop(self, error: BaseException) -> None:
        self._client._submitter.stop(error, told=True)

    def owned(self) -> list[JobRecord]:
        tracker = self._client._tracker
        return [
            tracker.record(job) for job in tracker.jobs.values() if not tracker.entry(job).replica
        ]


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
    (default: the system's trust store). ``trust_env`` (default True) honours the
    ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY`` environment for API calls and
    downloads alike; no ``.netrc`` login is ever sent. False connects directly.

    ``callback_url`` asks Kling to POST each task's snapshot there as it changes (push
    delivery), for every create whose request names none; it is added to the create's body
    only, never to the job's request (so no job store keeps it: it carries the receiver's
    secret). What arrives there is a hint: decode it with :meth:`Task.from_wire` and pass it
    to :meth:`observe`, which confirms it with an authenticated GET.

    ``store`` keeps the jobs so that a restart loses none (see :class:`JobStore`): a path
    makes the client an :class:`SQLiteJobStore` of its own (closed with the client), a store
    object is used and left open for its owner. On entering, the store's unfinished jobs
    are followed or submitted again and its ended ones answer :meth:`job`.

    The engine's seams, each with an in-process default: ``slot_limiter`` (the account's
    parallel-task slots, :class:`SlotLimiter`; default :class:`AdaptiveLimit`, learned from
    1303 answers up to ``max_active_tasks``), ``request_limiter`` (the request rate,
    :class:`RequestLimiter`; default a token bucket at ``max_requests_per_second``) and
    ``duration_stats`` (what each class of task has taken, :class:`DurationStats`). A
    shared implementation lets several clients of one account behave as one.

    ``account`` holds all of them, and the jobs, for several clients sharing one account
    (:class:`Account`; ``kling_async.redis.RedisAccount`` keeps them in Redis): the slots,
    the request budget, the learned durations, the jobs and their events are the account's,
    so every client sees every job, a callback may land on any of them, and the jobs of a
    client that dies are taken over by another. It replaces the four arguments above.
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
        trust_env: bool = True,
        callback_url: str | None = None,
        store: JobStore | str | os.PathLike[str] | None = None,
        slot_limiter: SlotLimiter | None = None,
        request_limiter: RequestLimiter | None = None,
        duration_stats: DurationStats | None = None,
        account: Account | None = None,
    ) -> None:
        # The one rule for credentials, base URL and profile (and their environment).
        resolved = resolve_account(
            api_key=api_key,
            access_key=access_key,
            secret_key=secret_key,
            base_url=base_url,
            profile=profile,
            environ=os.environ,
        )
        self._auth = resolved.auth
        self.profile = resolved.profile
        self.base_url = resolved.base_url
        if external_id_lookup == "profile":
            external_id_lookup = self.profile.external_id_lookup
        if external_id_lookup is not None and external_id_lookup not in _LOOKUP_FORMS:
            raise ValidationError(
                "external_id_lookup", external_id_lookup, f"must be one of {_LOOKUP_FORMS} or None"
            )
        if not isinstance(trust_env, bool):
            raise ValidationError("trust_env", trust_env, "must be True or False")
        if callback_url is not None and not (
            isinstance(callback_url, str)
            and callback_url.startswith(("http://", "https://"))
            and len(callback_url) <= 2048
        ):
            # Not quoted: a callback URL carries its receiver's secret token.
            raise ValidationError(
                "callback_url", "***", "must be an http:// or https:// URL of at most 2048 bytes"
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
        self.unreachable_after = unreachable_after
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._transport = HttpTransport(
            self.base_url,
            timeouts=Timeouts(connect=connect_timeout, read=timeout),
            max_connections=max_connections,
            ssl_context=ssl,
            trust_env=trust_env,
        )
        if slot_limiter is not None and not isinstance(slot_limiter, SlotLimiter):
            raise ValidationError("slot_limiter", slot_limiter, "must implement SlotLimiter")
        if request_limiter is not None and not isinstance(request_limiter, RequestLimiter):
            raise ValidationError(
                "request_limiter", request_limiter, "must implement RequestLimiter"
            )
        if duration_stats is not None and not isinstance(duration_stats, DurationStats):
            raise ValidationError("duration_stats", duration_stats, "must implement DurationStats")
        self._binding: AccountBinding | None = None
        if account is not None:
            if not isinstance(account, Account):
                raise ValidationError("account", account, "must implement Account")
            given = [
                name
                for name, value in (
                    ("slot_limiter", slot_limiter),
                    ("request_limiter", request_limiter),
                    ("duration_stats", duration_stats),
                    ("store", store),
                )
                if value is not None
            ]
            if given:
                raise UsageError(
                    f"account= holds the slots, request rate, durations and jobs itself; "
                    f"drop {', '.join(given)}"
                )
            self._binding = account.bind(
                AccountSettings(
                    fingerprint=_fingerprint(self.base_url, self._auth.secrets()[0]),
                    max_active_tasks=max_active_tasks,
                    max_requests_per_second=max_requests_per_second,
                    max_concurrent_submits=max_concurrent_submits,
                    poll=self.poll,
                    retry=self.retry,
                )
            )
            slot_limiter = self._binding.slots
            request_limiter = self._binding.requests
            duration_stats = self._binding.durations
            store = self._binding.store
        self._requests: RequestLimiter = request_limiter or RequestBudget(max_requests_per_second)
        self._health = Health(self._transport.host, unreachable_after=unreachable_after)
        self._api = Api(
            self._transport,
            self._auth,
            retry=self.retry,
            before_request=self._requests.acquire,
            on_rate_limited=self._rate_limited,
            health=self._health,
            # A server may quote a create's body back: the callback URL's token is a secret.
            secrets=_callback_secrets(callback_url),
        )
        lookup = external_id_lookup
        self.text2video = Text2VideoResource(
            self._api,
            profile=self.profile,
            create_settings=CreateSettings(retry=self.retry, settle_window=settle_window),
            poll=self.poll,
            external_id_lookup=lookup,
            callback_url=callback_url,
        )
        self._hub = EventHub()
        # A probe at least every 20 max intervals (20 minutes by default) while jobs wait.
        self._slots: SlotLimiter = slot_limiter or AdaptiveLimit(
            max_active_tasks,
            retry=self.retry,
            probe_period=20 * self.poll.max_interval,
            probe_interval=self.poll.probe_interval,
            unnoticed_ends=lambda since: self._tracker.unnoticed_ends(since),
            probe_debt_limit=2 * self.poll.max_interval,  # any end is seen within one
        )
        self._store, self._owns_store = _job_store(store)
        learned: LearnedDurations | None = None
        if duration_stats is None:
            duration_stats = learned = LearnedDurations(self.poll)
        self._tracker = Tracker(self._hub, self._slots, duration_stats)
        #: What the statistics learned is kept in the job store between runs, where it can.
        self._keeper: DurationKeeper | None = None
        durations_store: object = self._store
        if learned is not None and isinstance(durations_store, DurationStore):
            self._keeper = DurationKeeper(learned, durations_store)
        self._tracker.callback_url = callback_url
        if self._store is not None:
            self._tracker.store = StoreWriter(self._store, self._tracker.record)
        if self._binding is not None:
            self._tracker.forward = self._binding.forward
        self._submitter = Submitter(
            self.text2video,
            self._tracker,
            self._requests,
            retry=self.retry,
            settle_window=settle_window,
            health=self._health,
        )
        if self._binding is not None:
            self._submitter.on_stop = self._binding.stopped
        self._pool = PollerPool(
            self.text2video,
            self.poll,
            self._tracker,
            list_sweep=self.profile.supports_list if list_sweep is None else list_sweep,
        )
        self._workers = (max_concurrent_submits, pollers)
        self._stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._entered = False

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise UsageError("a KlingClient can be entered once; make a new one")
        self._entered = True
        async with AsyncExitStack() as stack:
            if self._binding is not None:
                await stack.enter_async_context(self._binding)
                # The slots still held are given back before the binding closes, so their
                # releases reach the account instead of waiting out their leases.
                stack.callback(self._tracker.closed)
            if self._owns_store:
                assert isinstance(self._store, SQLiteJobStore)
                await stack.enter_async_context(self._store)
            await self._transport.open()
            stack.push_async_callback(self._transport.aclose)
            stack.callback(self._hub.close)
            writer = self._tracker.store
            if writer is not None:
                # Written last thing before the session closes, after the task group ends.
                stack.push_async_callback(writer.flush)
            # Loaded before the task group exists, so a store that cannot load raises its own
            # error out of ``async with``, not one wrapped in an exception group.
            records = await writer.store.load() if writer is not None else []
            keeper = self._keeper
            if keeper is not None:
                await keeper.load()
                stack.push_async_callback(keeper.save)  # after the task group, before the store
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            submitters, pollers = self._workers
            self._task_group.start_soon(self._submitter.run, submitters, name="kling-submitters")
            self._task_group.start_soon(self._pool.run, pollers, name="kling-poll-dispatcher")
            if keeper is not None:
                self._task_group.start_soon(keeper.run, name="kling-durations")
            if writer is not None:
                self._task_group.start_soon(writer.run, name="kling-job-store")
                self._resume(records)
            self._stack = stack.pop_all()
            if self._binding is not None:
                try:
                    await self._task_group.start(
                        self._binding.serve, _Member(self), name="kling-account"
                    )
                except BaseException:
                    await self.__aexit__(None, None, None)
                    raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the background work and close. The body's exception, if any, goes through
        the task group's exit with it, so an error raised in the background beside it is
        reported together with it (in one exception group), never instead of it; alone, it
        leaves unchanged and unwrapped, so ``except ValueError`` around the block still works."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        self._task_group = None
        try:
            try:
                await stack.__aexit__(exc_type, exc, tb)
            finally:
                self._tracker.closed()
        except BaseExceptionGroup as group:
            if exc is None:
                raise
            _, rest = group.split(lambda error: error is exc)
            if rest is not None:
                raise
            # Only the body's own exception: returning lets it propagate as it was raised.

    async def aclose(self) -> None:
        """Stop all background work, end every iterator and close the session.

        Jobs keep their ``task_id``: tasks go on server-side and can be followed again with
        :meth:`track` by a new client (or are resumed from the job store). Safe to call more
        than once.
        """
        await self.__aexit__(None, None, None)

    @property
    def host(self) -> str:
        """The API's host name (where result files may always be fetched from)."""
        return self._transport.host

    def _running(self) -> None:
        if self._stack is None:
            state = "has closed" if self._entered else "is not running"
            raise UsageError(
                f"the client {state}: use it inside `async with KlingClient(...) as kling`"
            )

    def _resume(self, records: list[JobRecord]) -> None:
        """Bring back the store's jobs: ended ones as they were, the rest followed again
        (by task id) or submitted again (looked up first if a create may have gone out)."""
        for record in records:
            job = self._tracker.restore(record)
            if job.done:
                continue
            if record.task_id is not None:
                self._tracker.track(record.task_id, job=job)
            else:
                self._submitter.enqueue(job, resume=record.sent)

    # --- many jobs --------------------------------------------------------------------------

    def submit(self, request: Text2VideoRequest, *, resume: bool = False) -> Job:
        """Queue one text-to-video job behind the client's limits and return it at once.

        The request is validated now (a :class:`ValidationError` is raised here, before any
        network call) and given an ``external_task_id`` if it has none: that is the job's
        ``id`` from now on, and an id already used by a job of this client is refused.

        ``resume=True`` makes it safe to submit again what an earlier run (or this client,
        through its job store) may already have sent under the same ``external_task_id``:
        a job this client already has with that id is returned as it is (running, or ended
        with a task), except one that ended with no task (refused, unreachable, account
        stopped), which is queued again; otherwise the task is looked up first and created
        only if it does not exist.
        """
        return self.submit_many([request], resume=resume)[0]

    def submit_many(
        self, requests: Iterable[Text2VideoRequest], *, resume: bool = False
    ) -> list[Job]:
        """Queue many jobs; all are validated before any is queued (see :meth:`submit`)."""
        self._running()
        prepared = [self.text2video.prepare(request) for request in requests]
        ids: set[str] = set()
        for request in prepared:
            job_id = request.external_task_id
            assert job_id is not None
            known = self._tracker.find(job_id)
            if job_id in ids or (known is not None and not resume):
                raise ValidationError(
                    "external_task_id", job_id, "is already the id of a job of this client"
                )
            if known is not None and known.request is not None and known.request != request:
                raise ValidationError(
                    "external_task_id",
                    job_id,
                    "is the id of a job of this client with another request; resume needs "
                    "the same request",
                )
            ids.add(job_id)
        jobs = []
        for request in prepared:
            assert request.external_task_id is not None
            known = self._tracker.find(request.external_task_id)
            if known is not None and (not known.done or known.task_id is not None):
                jobs.append(known)  # resumed: already running, or ended with its task
                continue
            # A job that ended without a task is looked up first only if a create of it may
            # have gone out (as its record says), so one never sent is not flagged for nothing.
            maybe_sent = self._tracker.entry(known).sent if known is not None else resume
            job = self._tracker.queued(request, sent=maybe_sent, replace=known)
            self._submitter.enqueue(job, resume=maybe_sent)
            jobs.append(job)
        return jobs

    def track(self, task: str | Task) -> Job:
        """A job following a task created elsewhere or earlier (for example before a restart).

        ``task`` is a task id, or a :class:`Task` you fetched with this account (then the job
        starts from that snapshot: one that has ended gives a finished job at once, with no
        request and no slot). Tracking a task twice gives the same job, and a task this
        client has seen end (a job's, or one fetched with ``text2video.get`` or ``wait``)
        gives a finished job at once. A tracked task counts against
        ``max_active_tasks`` until it ends, since it holds one of the account's slots.
        """
        self._running()
        if isinstance(task, Task):
            return self._tracker.track_snapshot(task)
        if not isinstance(task, str) or not task:
            raise ValidationError("task", task, "must be a task id (a non-empty string) or a Task")
        ended = self.text2video.ended(task)
        if ended is not None and self._tracker.find(task) is None:
            return self._tracker.track_snapshot(ended)  # seen ending here: finished at once
        return self._tracker.track(task)

    def job(self, job_id: str) -> Job | None:
        """The job with this id (:attr:`Job.id`) or this task id, or None: jobs of this
        client, ended ones included, and those loaded from its job store."""
        if not isinstance(job_id, str) or not job_id:
            raise ValidationError("job_id", job_id, "must be a non-empty string")
        return self._tracker.find(job_id)

    async def forget_durations(self) -> None:
        """Forget what was learned of every class's durations, here and where it is kept
        (the job store, or a shared account's Redis): from now on, and in the next run, each
        class starts again from ``PollPolicy.initial_estimate``. For when the tasks' durations
        changed for good (another model version, another resource pack) and the old ones
        would only mislead the schedule for a while."""
        self._running()
        stats = self._tracker.durations
        if isinstance(stats, LearnedDurations):
            stats.reset()
        if self._keeper is not None:
            await self._keeper.forget()
            return
        # A shared account's statistics (Redis) forget in the account, for every client.
        forget = getattr(stats, "forget_durations", None)
        if forget is not None:
            await forget()

    async def lookup(self, job_id: str, *, timeout: float = 2.0) -> Job | None:  # noqa: ASYNC109
        """:meth:`job`, for a client of a shared account (``account=``): a job another
        client has just made reaches this one a moment later (its first change crosses the
        account), so an id not known yet is waited for, up to ``timeout`` seconds. Without a
        shared account it answers at once, as :meth:`job` does."""
        job = self.job(job_id)
        if job is not None or self._binding is None or self._stack is None:
            return job
        if not isinstance(timeout, int | float) or not 0 <= timeout <= 60:
            raise ValidationError("timeout", timeout, "must be a number of seconds in 0..60")
        with anyio.move_on_after(timeout):
            # A replica is registered by the account's reader: looking 50 times a second for
            # at most ``timeout`` costs less than waking a waiter on every registration.
            while (job := self._tracker.find(job_id)) is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return job

    def jobs(self, status: JobStatus | Iterable[JobStatus] | None = None) -> list[Job]:
        """Every job of this client, oldest first: running and ended ones, and those loaded
        from its job store; only those in ``status`` (one or several) when given."""
        if status is None:
            return list(self._tracker.jobs.values())
        wanted = {status} if isinstance(status, JobStatus) else set(status)
        for value in wanted:
            if not isinstance(value, JobStatus):
                raise ValidationError("status", value, "must be a JobStatus")
        return [job for job in self._tracker.jobs.values() if job.status in wanted]

    def observe(self, task: Task, *, confirmed: bool = False) -> Job | None:
        """Feed a snapshot of a task seen outside the pollers (a callback, another worker).

        ``confirmed=True`` says you fetched it yourself with this account's credentials: the
        job moves forward as if polled (states never move back). Unconfirmed (the default,
        right for anything that arrived from outside, such as a callback body), it changes
        nothing by itself: one that claims an end makes the client poll the task at once (at
        most once per ``min_interval``), with the credentials, and only that answer counts,
        so a forged snapshot (a fake ``succeed`` with someone else's URL) is never believed;
        one that claims no end says callbacks come for the task, which then keeps only a
        safety-net poll every ``PollPolicy.safety_interval``. Returns the job concerned, or
        None if no job this client follows has that task.
        """
        self._running()
        if not isinstance(task, Task):
            raise ValidationError("task", task, "must be a Task")
        if not isinstance(confirmed, bool):
            raise ValidationError("confirmed", confirmed, "must be True or False")
        return self._tracker.observe(task, confirmed=confirmed)

    def as_completed(self, jobs: Iterable[Job]) -> AsyncIterator[Job]:
        """Yield the jobs as they end (succeeded, failed or errored), first finished first."""
        return as_completed(self._hub, jobs)

    def events(self) -> AsyncIterator[JobEvent]:
        """Every state change of every job from now on (``queued`` and ``submitting``
        included), until the client closes."""
        return self._hub.events()

    @property
    def stats(self) -> ClientStats:
        slots = self._slots
        return ClientStats(
            requests=self._transport.api_requests + self._transport.file_requests,
            api_requests=self._transport.api_requests,
            file_requests=self._transport.file_requests,
            polls=self._pool.polls,
            sweeps=self._pool.sweeps,
            submitted=self._submitter.stats.submitted,
            rejected=self._submitter.stats.rejected,
            concurrency_limited=getattr(slots, "concurrency_limited", 0),
            slot_probes=getattr(slots, "slot_probes", 0),
            slot_probes_refused=getattr(slots, "slot_probes_refused", 0),
            queued=self._submitter.queued,
            active=slots.active,
            active_limit=slots.limit,
            peak_active=slots.peak_active,
            following=len(self._tracker.following),
            retries_refused=self._api.budget.refused if self._api.budget is not None else 0,
            connection_error=self._health.connect_error,
            connection_failing_for=self._health.failing_for,
        )

    def _rate_limited(self, retry_after: float | None) -> None:
        self._requests.pause(self.retry.delay(1, retry_after=retry_after, throttled=True))

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
