"""FastAPI integration: one client for the app's lifetime, a jobs router, push delivery.

::

    import kling_async as ka
    import kling_async.fastapi as kf

    app = FastAPI(lifespan=kf.lifespan(api_key=..., public_url="https://clips.example.com",
                                        store="jobs.sqlite3"))
    app.include_router(kf.router(dependencies=[Depends(my_auth)]), prefix="/kling")

    @app.post("/my-clip")
    async def my_clip(kling: kf.Kling, prompt: str) -> dict[str, object]:
        return kling.submit(ka.Text2VideoRequest(prompt=prompt)).to_dict()

:func:`lifespan` opens one :class:`~kling_async.KlingClient` when the app starts and closes it
when the app stops: every handler shares its limits, as Kling counts slots per account.
:data:`Kling` is the dependency that hands it to a handler. :func:`router` serves the jobs
(submit, look up, list, live events over Server-Sent Events, the finished clip) and the callback
receiver. With ``public_url``, every create asks Kling to POST the task's changes to that
receiver; a callback is only a hint (it comes unsigned from the network): it makes the client
poll the task with its credentials at once, and only that answer changes a job. The callback
path carries an unguessable token, compared in constant time, and bodies are capped at 64 KiB.

Needs the ``[fastapi]`` extra (FastAPI with its own ``EventSourceResponse``). See
https://kling-async.github.io/kling-async/fastapi/ (``docs/fastapi.md``).
"""

import copy
import hmac
import inspect
import json
import logging
import math
import os
import re
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from hashlib import sha256
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.abc

import kling_async as ka

try:
    from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
    from fastapi.params import Depends as DependsParam
    from fastapi.requests import HTTPConnection
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from fastapi.sse import EventSourceResponse, ServerSentEvent
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kling_async.fastapi needs the [fastapi] extra: pip install 'kling-async[fastapi]' "
        "(FastAPI 0.135 or newer)"
    ) from exc

__all__ = [
    "CALLBACK_BODY_LIMIT",
    "Integration",
    "Kling",
    "lifespan",
    "router",
]

log = logging.getLogger("kling_async")

#: The largest callback body read; a larger one gets 413 after no more than this is read.
CALLBACK_BODY_LIMIT = 64 * 1024
#: The largest ``POST /jobs`` body read (a list of hundreds of requests fits).
_SUBMIT_BODY_LIMIT = 8 * 1024 * 1024
#: Recent events kept for ``GET /events`` reconnects (each job's own are all kept).
_REPLAY = 10_000
_STATE_KEY = "kling_async"
_CALLBACK_ROUTE = "kling_async_callback"
_TOKEN_RULE = re.compile(r"[A-Za-z0-9_-]{22,256}")
_DOWNLOADS_AT_ONCE = 4
_DOWNLOAD_RETRY_AFTER = 30.0


# --- the event log: ids for Server-Sent Events ------------------------------------------------


class EventLog:
    """Every job's state changes seen by this app, numbered, so a stream can resume.

    An event's id is ``<epoch>-<n>``: ``n`` counts up in this process and ``epoch`` names the
    process, so an id from before a restart is recognised as such (the stream then replays the
    job's states as this process knows them: at worst one seen twice, never one lost). Each
    job's own events are all kept (a job changes state a handful of times); the last
    ``replay`` events of all jobs are kept for ``GET /events``.
    """

    def __init__(self, replay: int = _REPLAY) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.recent: deque[tuple[int, float, ka.JobEvent]] = deque(maxlen=replay)
        self._by_job: dict[str, list[tuple[int, float, ka.JobEvent]]] = {}
        self._changed = anyio.Event()
        self.closed = False

    def add(self, event: ka.JobEvent) -> None:
        self.seq += 1
        item = (self.seq, time.time(), event)
        self.recent.append(item)
        self._by_job.setdefault(event.job.id, []).append(item)
        self._changed.set()
        self._changed = anyio.Event()

    def seed(self, job: ka.Job) -> None:
        """Start a job known before this log (loaded from the store) at its current state."""
        if job.id not in self._by_job:
            self.add(ka.JobEvent(job, job.task, job.status, job.error))

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 (the heartbeat's period)
        """Wait for the next event (True) or ``timeout`` seconds (False)."""
        changed = self._changed
        with anyio.move_on_after(timeout):
            await changed.wait()
            return True
        return False

    def event_id(self, seq: int) -> str:
        return f"{self.epoch}-{seq}"

    def parse(self, event_id: str | None) -> int | None:
        """The number of an event id of this process (0: before its first event); -1 for one
        of another process, or not one of ours, which no event kept here follows; None when
        there is none. -1, not 0: ``GET /jobs`` hands out ``<epoch>-0`` before the first
        event, and a reader resuming from it has missed nothing."""
        if not event_id:
            return None
        epoch, _, number = event_id.strip().partition("-")
        if epoch != self.epoch or not (number.isascii() and number.isdigit()) or len(number) > 18:
            return -1
        return min(int(number), self.seq)

    def of_job(self, job_id: str, after: int) -> list[tuple[int, float, ka.JobEvent]]:
        return [item for item in self._by_job.get(job_id, ()) if item[0] > after]

    def end_of(self, job_id: str) -> int | None:
        """The number of the job's terminal event, once it is numbered here (None before:
        a job that has just ended in the client is numbered at this log's task's next turn,
        and a reader must not be told it has seen the end before the end is here)."""
        items = self._by_job.get(job_id)
        if items and items[-1][2].status.is_terminal:
            return items[-1][0]
        return None

    def since(self, after: int) -> list[tuple[int, float, ka.JobEvent]] | None:
        """Every event after ``after``, or None when some of them are no longer kept (always
        for -1: what a reader of another process missed is not here)."""
        if after < 0:
            return None
        if after >= self.seq:
            return []
        if not self.recent or self.recent[0][0] > after + 1:
            return None
        start = after + 1 - self.recent[0][0]
        return [self.recent[i] for i in range(start, len(self.recent))]


def event_view(item: tuple[int, float, ka.JobEvent], request: Request) -> dict[str, Any]:
    """An event as JSON: the job's snapshot (``Job.to_dict`` keys and ``links``, as the
    router's other answers) as of that change."""
    _, at, event = item
    job = event.job
    view = job.to_dict()
    task, error = event.task, event.error
    view["status"] = event.status.value
    view["task"] = None if task is None else task.to_dict()
    if task is not None:
        view["task_id"] = task.task_id
    elif event.status in (ka.JobStatus.QUEUED, ka.JobStatus.SUBMITTING):
        view["task_id"] = None  # not created yet, as of this event
    if not event.status.is_terminal:
        view["error"] = None
        view["ended_at"] = None
    elif error is not None:
        view["error"] = {"type": type(error).__name__, "message": str(error)}
        if isinstance(error, ka.RestoredError):
            view["error"] = {"type": error.error_type, "message": error.message}
    view["updated_at"] = _iso(at)
    view["links"] = _links(request, job)
    return view


def _iso(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).isoformat()


# --- downloads into a directory ---------------------------------------------------------------


class Downloads:
    """The finished clips, fetched into a directory as their jobs succeed (through
    :meth:`KlingClient.download`: atomic, checked, and only from hosts its rules allow)."""

    def __init__(self, client: ka.KlingClient, directory: Path, **options: Any) -> None:
        self._client = client
        self.directory = directory
        self._options = options
        self._running: set[str] = set()
        self.failed: dict[str, tuple[float, str]] = {}
        self._limiter = anyio.CapacityLimiter(_DOWNLOADS_AT_ONCE)
        self._group: anyio.abc.TaskGroup | None = None

    def path_of(self, job_id: str) -> Path:
        """A file name for the job's clip that no id can turn into another path."""
        name = urllib.parse.quote(job_id, safe="")
        if len(name) > 150:
            # "%s" is never made by quote(): no job's own name can be another's hash.
            name = "%sha256-" + sha256(job_id.encode()).hexdigest()
        return self.directory / f"{name}.mp4"

    def state(self, job_id: str) -> str:
        if self.path_of(job_id).is_file():
            return "ready"
        if job_id in self._running:
            return "downloading"
        if job_id in self.failed:
            return "failed"
        return "missing"

    def start(self, job: ka.Job) -> None:
        """Fetch the clip of a succeeded job unless it is here or on its way already (one that
        failed lately is tried again only after a pause)."""
        if self._group is None or job.status is not ka.JobStatus.SUCCEEDED:
            return
        state = self.state(job.id)
        if state in ("ready", "downloading"):
            return
        if state == "failed" and time.monotonic() - self.failed[job.id][0] < _DOWNLOAD_RETRY_AFTER:
            return
        self._running.add(job.id)
        self._group.start_soon(self._fetch, job, name=f"kling-download-{job.id}")

    async def _fetch(self, job: ka.Job) -> None:
        try:
            async with self._limiter:
                task = job.task if job.task is not None and job.task.videos else job.task_id
                assert task is not None
                await self._client.download(task, self.path_of(job.id), **self._options)
            self.failed.pop(job.id, None)
        except (ka.KlingError, OSError) as error:
            self.failed[job.id] = (time.monotonic(), str(error))
            log.warning("download of job %s's clip failed: %s", job.id, error)
        except Exception as error:
            # A bug must cost this clip only, never the app's client beside it.
            self.failed[job.id] = (time.monotonic(), f"{type(error).__name__}: {error}")
            log.exception("download of job %s's clip failed unexpectedly", job.id)
        finally:
            self._running.discard(job.id)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            task_status.started()
            await anyio.sleep_forever()


# --- the integration: what the lifespan holds -------------------------------------------------


class Integration:
    """What :func:`lifespan` keeps for the app's lifetime: the client, the callback token,
    the event log and the downloads. Handlers reach the client through :data:`Kling`."""

    def __init__(
        self,
        client: ka.KlingClient,
        *,
        token: str,
        callback_url: str | None,
        downloads: Downloads | None,
    ) -> None:
        self.client = client
        self.token = token
        self.callback_url = callback_url
        self.downloads = downloads
        self.log = EventLog()

    def __repr__(self) -> str:
        return f"Integration(client={self.client!r}, callbacks={self.callback_url is not None})"

    def token_matches(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.token.encode())

    async def collect(self, events: AsyncIterator[ka.JobEvent]) -> None:
        """Number every event of the client for the streams, and start downloads."""
        try:
            async for event in events:
                self.log.add(event)
                if event.status is ka.JobStatus.SUCCEEDED and self.downloads is not None:
                    self.downloads.start(event.job)
        finally:
            self.log.close()


class _TokenFilter(logging.Filter):
    """Masks the callback token in access logs (the server logs each request's path)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(self._has(arg) for arg in args):
            record.args = tuple(self._mask(arg) for arg in args)
        elif isinstance(args, Mapping) and any(self._has(arg) for arg in args.values()):
            # hypercorn and gunicorn log one mapping of fields per request.
            # A copy of the server's own mapping: its class answers missing fields and
            # header lookups its own way.
            masked = copy.copy(args)
            for key, arg in args.items():
                masked[key] = self._mask(arg)  # type: ignore[index]
            record.args = masked
        if isinstance(record.msg, str) and self._token in record.msg:
            record.msg = record.msg.replace(self._token, "***")
        return True

    def _has(self, arg: object) -> bool:
        return isinstance(arg, str) and self._token in arg

    def _mask(self, arg: object) -> object:
        return arg.replace(self._token, "***") if isinstance(arg, str) else arg


_ACCESS_LOGGERS = ("uvicorn.access", "hypercorn.access", "gunicorn.access")


def _check_public_url(public_url: object) -> str | None:
    if public_url is None:
        return None
    parts = urllib.parse.urlsplit(public_url) if isinstance(public_url, str) else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or len(public_url) > 1024  # type: ignore[arg-type]
    ):
        raise ka.ValidationError(
            "public_url",
            public_url,
            "must be the http:// or https:// URL where Kling reaches this app (no query)",
        )
    assert isinstance(public_url, str)
    return public_url.rstrip("/")


def _check_token(token: object) -> str:
    if token is None:
        token = os.environ.get("KLING_CALLBACK_TOKEN") or secrets.token_urlsafe(32)
    if not isinstance(token, str) or not _TOKEN_RULE.fullmatch(token):
        # Not quoted: it is a secret.
        raise ka.ValidationError(
            "callback_token", "***", "must be 22 to 256 characters of A-Z, a-z, 0-9, _ and -"
        )
    return token


def lifespan(
    *,
    public_url: str | None = None,
    callback_token: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
    download_options: Mapping[str, Any] | None = None,
    app_lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None = None,
    **client_options: Any,
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    """A FastAPI lifespan that opens one :class:`~kling_async.KlingClient` for the app's life.

    ``client_options`` go to the client as they are (``api_key``, ``store``,
    ``max_active_tasks``, ...). ``public_url`` is where Kling reaches this app from the
    internet (its root, as ``https://clips.example.com``): with it, every create asks Kling to
    POST the task's changes to the router's callback receiver (:func:`router` must be
    included). ``callback_token`` is the receiver's secret path segment (default: the
    ``KLING_CALLBACK_TOKEN`` environment variable, else a new random one per start; set one
    that outlives restarts so callbacks of tasks created before a restart still count; with
    ``account=`` (several workers, ``kling_async.redis.RedisAccount``) one must be given, the
    same for every worker, since a callback may land on any of them).
    ``download_dir`` makes the app fetch each succeeded job's clip there (with
    ``download_options`` for :meth:`KlingClient.download`), and ``GET /jobs/{id}/video``
    serve it from there. ``app_lifespan`` is the app's own lifespan: it runs inside, with the
    client open, and what it yields joins the state.

    To nest it in a lifespan of your own instead: ``async with kf.lifespan(...)(app) as
    state: yield state``.
    """
    public = _check_public_url(public_url)
    shared = client_options.get("account") is not None
    if (
        shared
        and public is not None
        and callback_token is None
        and not os.environ.get("KLING_CALLBACK_TOKEN")
    ):
        # A callback may land on any worker: each must know the token the others put in
        # their tasks' callback URL, and a token is a secret, never kept in the account.
        raise ka.UsageError(
            "several workers share one account: give them one callback token "
            "(KLING_CALLBACK_TOKEN in their environment, or callback_token=)"
        )
    token = _check_token(callback_token)
    if "callback_url" in client_options and public is not None:
        raise ka.ValidationError(
            "callback_url", "***", "is made from public_url: give one or the other"
        )
    directory = None if download_dir is None else Path(download_dir)
    options = dict(download_options or {})
    known = set(inspect.signature(ka.KlingClient.download).parameters) - {"self", "task", "path"}
    for name in options:
        if name not in known:
            raise ka.ValidationError(
                f"download_options.{name}",
                options[name],
                f"is not an option of KlingClient.download ({', '.join(sorted(known))})",
            )

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        callback_url = None
        if public is not None:
            try:
                path = app.url_path_for(_CALLBACK_ROUTE, token=token)
            except Exception as exc:  # starlette's NoMatchFound
                raise ka.UsageError(
                    "kf.lifespan(public_url=...) needs the router: "
                    "app.include_router(kf.router(), prefix=...)"
                ) from exc
            callback_url = public + str(path)
        filters = [(logging.getLogger(name), _TokenFilter(token)) for name in _ACCESS_LOGGERS]
        for logger, token_filter in filters:
            logger.addFilter(token_filter)
        try:
            if callback_url is not None:
                client_options["callback_url"] = callback_url
            client = ka.KlingClient(**client_options)
            async with client, AsyncExitStack() as stack:
                downloads = None
                if directory is not None:
                    directory.mkdir(parents=True, exist_ok=True)
                    downloads = Downloads(client, directory, **options)
                integration = Integration(
                    client, token=token, callback_url=callback_url, downloads=downloads
                )
                # Listening and seeding before anything awaits: no change is missed or
                # numbered twice, and the jobs loaded from the store start at their state.
                events = client.events()
                for job in client.jobs():
                    integration.log.seed(job)
                group = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(group.cancel_scope.cancel)
                group.start_soon(integration.collect, events, name="kling-fastapi-events")
                if downloads is not None:
                    await group.start(downloads.run, name="kling-fastapi-downloads")
                    for job in client.jobs(ka.JobStatus.SUCCEEDED):
                        downloads.start(job)
                state: dict[str, Any] = {_STATE_KEY: integration}
                if app_lifespan is not None:
                    inner = await stack.enter_async_context(app_lifespan(app))
                    if isinstance(inner, Mapping):
                        state.update(inner)
                yield state
        finally:
            for logger, token_filter in filters:
                logger.removeFilter(token_filter)

    return run


async def _integration(connection: HTTPConnection) -> Integration:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, and the client and
    # the event log belong to the event loop's thread. An HTTPConnection, so that WebSocket
    # handlers get the client too.
    return _integration_of(connection)


def _integration_of(connection: HTTPConnection) -> Integration:
    integration = getattr(connection.state, _STATE_KEY, None)
    if not isinstance(integration, Integration):
        raise ka.UsageError(
            "kling_async.fastapi needs its lifespan: FastAPI(lifespan=kf.lifespan(...)), "
            "or nest kf.lifespan(...)(app) in yours and yield its state"
        )
    return integration


async def _client(connection: HTTPConnection) -> ka.KlingClient:
    return _integration_of(connection).client


#: The dependency type for handlers: ``async def handler(kling: kf.Kling): ...``.
Kling = Annotated[ka.KlingClient, Depends(_client)]
_It = Annotated[Integration, Depends(_integration)]


# --- the router -------------------------------------------------------------------------------


def _error(status: int, detail: object, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


def _invalid(error: ka.ValidationError, index: int | None) -> JSONResponse:
    loc: list[str | int] = ["body"] if index is None else ["body", index]
    if error.field != "request":  # "request" is the whole item (not a mapping): no key of it
        loc.extend(part for part in error.field.split(".") if part)
    return _error(
        422,
        [
            {
                "loc": loc,
                "msg": str(error),
                "type": "value_error",
                "field": error.field,
                "rule": error.rule,
            }
        ],
    )


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it is over ``limit`` bytes (no more than that is read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _not_here() -> ka.ValidationError:
    return ka.ValidationError(
        "callback_url", "***", "is not accepted here: the app's lifespan sets it (public_url)"
    )


def _links(request: Request, job: ka.Job) -> dict[str, str]:
    # The id is quoted into the path (any id, even one made elsewhere, gives a working link
    # and an ASCII header), not handed to url_for, which refuses a "/" in it.
    quoted = "/" + urllib.parse.quote(job.id, safe="")
    return {
        name: _put_id(request.url_for(route, job_id=_SLOT).path, quoted)
        for name, route in (
            ("self", "kling_async_job"),
            ("events", "kling_async_job_events"),
            ("video", "kling_async_job_video"),
        )
    }


_SLOT = "kling-async-job-id"


def _put_id(path: str, quoted: str) -> str:
    # The last one: a prefix may contain the placeholder's text too.
    head, _, tail = path.rpartition("/" + _SLOT)
    return head + quoted + tail


#: Ids a job submitted through the router may have: they travel in its URLs as they are.
_JOB_ID_RULE = re.compile(r"[A-Za-z0-9_.~-]{1,128}")


def _view(request: Request, job: ka.Job) -> dict[str, Any]:
    view = job.to_dict()
    view["links"] = _links(request, job)
    return view


async def _find(kling: ka.KlingClient, job_id: str) -> ka.Job:
    # A job another worker of a shared account has just made may reach this one a moment
    # after the client that posted it was answered.
    job = await kling.lookup(job_id) if job_id else None
    if job is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return job


_STATUSES = {status.value: status for status in ka.JobStatus}
_STATUS_GROUPS = {
    "active": [s for s in ka.JobStatus if not s.is_terminal],
    "done": [s for s in ka.JobStatus if s.is_terminal],
}


def _statuses(values: Sequence[str]) -> list[ka.JobStatus]:
    wanted: list[ka.JobStatus] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part in _STATUS_GROUPS:
                wanted.extend(_STATUS_GROUPS[part])
            elif part in _STATUSES:
                wanted.append(_STATUSES[part])
            elif part:
                allowed = ", ".join([*_STATUSES, *_STATUS_GROUPS])
                raise HTTPException(
                    422,
                    [
                        {
                            "loc": ["query", "status"],
                            "msg": f"status={part!r} is invalid: must be one of {allowed}",
                            "type": "value_error",
                        }
                    ],
                )
    return wanted


_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "maxLength": 2500},
        "negative_prompt": {"type": "string", "maxLength": 2500},
        "model_name": {"type": "string", "example": "kling-v1-6"},
        "mode": {"type": "string", "enum": ["std", "pro"]},
        "duration": {"type": "string", "enum": ["5", "10"]},
        "aspect_ratio": {"type": "string", "enum": ["16:9", "9:16", "1:1"]},
        "cfg_scale": {"type": "number", "minimum": 0, "maximum": 1},
        "camera_control": {"type": "object"},
        "external_task_id": {
            "type": "string",
            "description": "your id for the job; submitting it again returns the same job",
        },
        "callback_url": {"type": "string"},
        "extra": {"type": "object", "description": "fields this SDK does not know yet"},
    },
}
_SUBMIT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _REQUEST_SCHEMA,
                        {"type": "array", "items": _REQUEST_SCHEMA, "minItems": 1},
                    ]
                }
            }
        },
    }
}


class _Pace:
    """When a stream should end, and when it owes a heartbeat: after ``heartbeat`` seconds
    with nothing sent (other jobs' events wake a stream too, and are no reason for one)."""

    def __init__(self, heartbeat: float, stream_timeout: float | None) -> None:
        self.heartbeat = heartbeat
        now = anyio.current_time()
        self.deadline = math.inf if stream_timeout is None else now + stream_timeout
        self.sent = now

    def mark(self) -> None:
        self.sent = anyio.current_time()

    async def idle(self, event_log: EventLog) -> bool:
        """Wait for the next event or heartbeat; False when the stream should end (the
        client is closing, or the stream's time is up). No cancel scope is held across a
        ``yield`` of the streams: their generator is driven by another task than the one
        whose scope it would be."""
        if event_log.closed:
            return False
        now = anyio.current_time()
        left = self.deadline - now
        if left <= 0:
            return False
        await event_log.wait(max(0.0, min(self.sent + self.heartbeat - now, left)))
        return not event_log.closed and anyio.current_time() < self.deadline

    def owed(self) -> bool:
        return anyio.current_time() - self.sent >= self.heartbeat


def router(
    *,
    dependencies: Sequence[DependsParam] | None = None,
    heartbeat: float = 15.0,
    stream_timeout: float | None = 600.0,
    tags: Sequence[str] = ("kling",),
) -> APIRouter:
    """The jobs router: mount it under any prefix, ``app.include_router(kf.router(),
    prefix="/kling")``.

    ``dependencies`` guard every jobs route (submitting costs money: pass your auth); the
    callback receiver is guarded by its token instead (Kling cannot log in). Routes:

    - ``POST /jobs``: one request or a list (the SDK's rules, 422 with its message on bad
      input, before any network call); 202 with the jobs and ``Location``. A request whose
      ``external_task_id`` is a job's already gives that job back (a retried POST creates
      nothing); with another request it is 409.
    - ``GET /jobs/{id}`` (a job id or a task id), ``GET /jobs?status=...&limit=&after=``.
    - ``GET /jobs/{id}/events``: Server-Sent Events, one per state change from ``queued``
      to the end, each with an ``id:`` (a reconnect with ``Last-Event-ID`` gets what it
      missed), a comment every ``heartbeat`` seconds, closed after the terminal one (a
      reconnect after it gets 204, which ends a browser's ``EventSource``).
    - ``GET /events``: every job's events, for a dashboard (``?after=`` or
      ``Last-Event-ID`` to resume; ``event: reset`` when what was missed is gone).
    - ``GET /jobs/{id}/video``: the clip, from the download directory when the lifespan has
      one, else a redirect to the task's result URL.
    - ``POST /callbacks/{token}``: the receiver that ``public_url`` points Kling to.

    A stream ends after ``stream_timeout`` seconds (a browser reconnects on its own, losing
    nothing), so a server shutting down gracefully is not held open by it.
    """
    if not isinstance(heartbeat, int | float) or not 0 < heartbeat <= 3600:
        raise ka.ValidationError("heartbeat", heartbeat, "must be seconds in (0, 3600]")
    if stream_timeout is not None and (
        not isinstance(stream_timeout, int | float) or not stream_timeout > 0
    ):
        raise ka.ValidationError("stream_timeout", stream_timeout, "must be seconds > 0, or None")
    outer = APIRouter(tags=list(tags))
    jobs = APIRouter(dependencies=list(dependencies or ()))

    @jobs.post("/jobs", status_code=202, name="kling_async_submit", openapi_extra=_SUBMIT_OPENAPI)
    async def submit(request: Request, kling: Kling) -> JSONResponse:
        """Submit one request or a list; 202 with the jobs."""
        body = await _read_body(request, _SUBMIT_BODY_LIMIT)
        if body is None:
            return _error(413, f"the body is over {_SUBMIT_BODY_LIMIT} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return _error(422, [{"loc": ["body"], "msg": "the body is not JSON", "type": "json"}])
        many = isinstance(payload, list)
        items = payload if many else [payload]
        if not items:
            return _error(
                422, [{"loc": ["body"], "msg": "the list of requests is empty", "type": "value"}]
            )
        # Validated all before any is queued; a request naming a job's id resumes that job
        # (a retried POST creates nothing; one that ended without a task goes again).
        prepared: list[ka.Text2VideoRequest] = []
        ids: set[str] = set()
        for index, item in enumerate(items):
            try:
                req = kling.text2video.prepare(ka.Text2VideoRequest.from_dict(item))
                if req.callback_url is not None:
                    # Whoever calls the app must not point Kling at a URL of their choosing,
                    # nor take the job's callbacks away from this app.
                    raise _not_here()
            except ka.ValidationError as error:
                return _invalid(error, index if many else None)
            job_id = req.external_task_id
            assert job_id is not None
            if not _JOB_ID_RULE.fullmatch(job_id) or job_id in (".", ".."):
                odd = ka.ValidationError(
                    "external_task_id",
                    job_id,
                    "must be 1 to 128 characters of A-Z, a-z, 0-9, _ . ~ - (it is the job's "
                    "id in its URLs)",
                )
                return _invalid(odd, index if many else None)
            if job_id in ids:
                twice = ka.ValidationError(
                    "external_task_id", job_id, "is given to two requests of this list"
                )
                return _invalid(twice, index if many else None)
            ids.add(job_id)
            job = kling.job(job_id)
            if job is not None and job.id != job_id:
                # The task id of another job: resuming "it" would resume that job (and fail
                # after the others of the list were queued).
                return _error(409, f"external_task_id={job_id!r} is the task id of job {job.id!r}")
            if job is not None and job.request != req:
                return _error(
                    409, f"external_task_id={job_id!r} is the id of a job with another request"
                )
            prepared.append(req)
        resumed = [kling.job(req.external_task_id or "") is not None for req in prepared]
        pairs = list(zip(prepared, resumed, strict=True))
        try:
            fresh = iter(kling.submit_many(r for r, old in pairs if not old))
            again = iter(kling.submit_many((r for r, old in pairs if old), resume=True))
        except ka.ValidationError as error:
            return _invalid(error, None)
        except ka.UsageError:
            return _error(503, "the Kling client is shutting down", {"Retry-After": "5"})
        out = [next(again) if old else next(fresh) for old in resumed]
        views = [_view(request, job) for job in out]
        location = views[0]["links"]["self"] if not many else request.url_for("kling_async_list")
        return JSONResponse(
            {"jobs": views} if many else views[0],
            status_code=202,
            headers={"Location": str(getattr(location, "path", location))},
        )

    @jobs.get("/jobs", name="kling_async_list")
    async def list_jobs(
        request: Request,
        integration: _It,
        status: Annotated[list[str] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Query()] = None,
    ) -> JSONResponse:
        """Jobs, oldest first: ``status`` filters (repeat it, or comma-separate; ``active``
        and ``done`` name groups), ``after`` is the last id of the previous page."""
        wanted = set(_statuses(status)) if status else None
        every = integration.client.jobs()
        start = 0
        if after is not None:
            # A place in the list of all jobs, not in the filtered one: the job that ended
            # the previous page may have left the filter since (an active job that ended).
            ids = [job.id for job in every]
            if after not in ids:
                raise HTTPException(422, f"after={after!r} is not the id of a job")
            start = ids.index(after) + 1
        found = [job for job in every[start:] if wanted is None or job.status in wanted]
        page = found[:limit]
        more = limit < len(found)
        return JSONResponse(
            {
                "jobs": [_view(request, job) for job in page],
                "next": page[-1].id if more and page else None,
                "last_event_id": integration.log.event_id(integration.log.seq),
            }
        )

    @jobs.get("/jobs/{job_id}", name="kling_async_job")
    async def get_job(job_id: str, request: Request, kling: Kling) -> JSONResponse:
        """One job (by its id or its task id)."""
        return JSONResponse(_view(request, await _find(kling, job_id)))

    async def stream_start(
        job_id: str,
        integration: _It,
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[str | None, Query()] = None,
    ) -> tuple[ka.Job, int]:
        job = await _find(integration.client, job_id)
        seen = integration.log.parse(last_event_id or after)
        end = integration.log.end_of(job.id)
        if seen is not None and seen > 0 and job.done and end is not None and seen >= end:
            raise HTTPException(204)  # it ended and the reader saw that: nothing more, ever
        return job, seen or 0

    @jobs.get(
        "/jobs/{job_id}/events", response_class=EventSourceResponse, name="kling_async_job_events"
    )
    async def job_events(
        request: Request,
        integration: _It,
        start: Annotated[tuple[ka.Job, int], Depends(stream_start)],
    ) -> AsyncIterator[ServerSentEvent]:
        """The job's state changes as Server-Sent Events, until its end."""
        job, cursor = start
        event_log = integration.log
        pace = _Pace(heartbeat, stream_timeout)
        while True:
            for item in event_log.of_job(job.id, cursor):
                cursor = item[0]
                yield ServerSentEvent(id=event_log.event_id(cursor), data=event_view(item, request))
                pace.mark()
                current = integration.client.job(job.id)
                if item[2].status.is_terminal and (current is None or current.done):
                    return
            if not await pace.idle(event_log):
                return
            if pace.owed():
                yield ServerSentEvent(comment="heartbeat")
                pace.mark()

    @jobs.get("/events", response_class=EventSourceResponse, name="kling_async_events")
    async def all_events(
        request: Request,
        integration: _It,
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[str | None, Query()] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        """Every job's state changes as Server-Sent Events (from now, or after an id)."""
        event_log = integration.log
        seen = event_log.parse(last_event_id or after)
        cursor = event_log.seq if seen is None else seen
        pace = _Pace(heartbeat, stream_timeout)
        while True:
            items = event_log.since(cursor)
            if items is None:
                # What the reader missed is no longer kept (or is from before a restart):
                # it should reload the jobs, then go on from here.
                cursor = event_log.seq
                yield ServerSentEvent(
                    id=event_log.event_id(cursor),
                    event="reset",
                    data={"reason": "missed events are gone: reload GET /jobs"},
                )
                continue
            for item in items:
                cursor = item[0]
                yield ServerSentEvent(id=event_log.event_id(cursor), data=event_view(item, request))
                pace.mark()
            if not await pace.idle(event_log):
                return
            if pace.owed():
                yield ServerSentEvent(comment="heartbeat")
                pace.mark()

    @jobs.get("/jobs/{job_id}/video", name="kling_async_job_video", response_model=None)
    async def video(job_id: str, integration: _It) -> Response:
        """The finished clip: the downloaded file, or a redirect to the result URL."""
        job = await _find(integration.client, job_id)
        if job.status is not ka.JobStatus.SUCCEEDED or job.task is None:
            return _error(409, f"job {job.id!r} has no clip: it is {job.status.value}")
        downloads = integration.downloads
        if downloads is not None:
            state = downloads.state(job.id)
            if state == "ready":
                return FileResponse(downloads.path_of(job.id), media_type="video/mp4")
            if state == "failed":
                _, reason = downloads.failed[job.id]
                downloads.start(job)  # again, after a pause
                return _error(502, f"the clip of job {job.id!r} could not be downloaded: {reason}")
            downloads.start(job)
            return _error(503, f"the clip of job {job.id!r} is downloading", {"Retry-After": "2"})
        url = job.task.video.url if job.task.video is not None else ""
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            return _error(502, f"job {job.id!r} has no http(s) result URL")
        return RedirectResponse(url, status_code=307)

    outer.include_router(jobs)

    @outer.post("/callbacks/{token}", name=_CALLBACK_ROUTE, include_in_schema=False)
    async def callback(token: str, request: Request) -> Response:
        """Kling's push delivery: a hint, confirmed by the client with its credentials."""
        integration = _integration_of(request)
        if not integration.token_matches(token):
            return _error(404, "Not Found")
        body = await _read_body(request, CALLBACK_BODY_LIMIT)
        if body is None:
            return _error(413, f"a callback body is at most {CALLBACK_BODY_LIMIT} bytes")
        try:
            task = ka.Task.from_wire(body)
        except ka.ResponseDecodeError:
            return _error(400, "the body is not a Kling task object")
        try:
            integration.client.observe(task)
        except ka.UsageError:
            return _error(503, "the Kling client is shutting down", {"Retry-After": "5"})
        return JSONResponse({"received": True})

    return outer
