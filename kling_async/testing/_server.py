"""The HTTP face of the emulator's API: routes, the order of checks, and fault delivery.

Every API request goes through the same gates in the same order a real gateway applies them:
rate limit (1302), authentication (401), then a fault draw (so a fault hits only a request the
server would have processed), then the route's own work. Handlers are thin; the shapes live in
``_wire``, the rules in ``_validation`` and ``_auth``, the tasks in ``_state``, the files in
``_files`` (served on their own port) and the state file in ``_persist``.

Two settings reproduce what real backends do to lookups. ``visibility_lag`` hides a new task
from lookups by ``external_task_id`` and from the list for a while (an index that lags the
write), while a GET by task id finds it at once. ``cometapi_lookups=False`` serves on the
``/kling`` family only what CometAPI documents: no list and no external-id lookups.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
from aiohttp import web
from aiohttp.typedefs import Handler

from ._auth import Authenticator, AuthError, AuthMode
from ._callbacks import CallbackScheduler
from ._clock import EmulatedClock
from ._conn import drop, stall
from ._faults import AFTER_COMMIT, BEFORE_COMMIT, FaultInjector, FaultKind
from ._ratelimit import TokenBucket
from ._state import EmulatedTask, EmulatorStats, TaskStore
from ._validation import COMETAPI, OFFICIAL, InvalidRequest, parse_create
from ._video import VideoLinks
from ._wire import cometapi_error, created, dumps, kling_error, success, task_object

if TYPE_CHECKING:
    from ._persist import StateFile

DuplicatePolicy = Literal["reject", "return_first", "allow"]
UnknownTaskStyle = Literal["kling_1201", "kling_1203", "new_api"]
DUPLICATE_POLICIES: Final = ("reject", "return_first", "allow")

logger = logging.getLogger("kling_async.testing")

ACCOUNT_ERRORS: Final[Mapping[int, tuple[int, str]]] = {
    1100: (429, "Account exception"),
    1101: (429, "Account in arrears: please recharge"),
    1102: (429, "Resource pack exhausted or expired"),
    1103: (403, "No permission to access this API or model"),
    1304: (429, "Request blocked by the IP whitelist policy"),
}
PAGE_NUM_MAX: Final = 1000
PAGE_SIZE_MAX: Final = 500
PAGE_SIZE_DEFAULT: Final = 30

_BAD_GATEWAY_HTML: Final = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


class Rejection(Exception):
    """An error answer: HTTP status, body, and the Kling code (``None`` for other envelopes)."""

    def __init__(self, status: int, body: dict[str, Any], code: int | None) -> None:
        super().__init__(status, code)
        self.status = status
        self.body = body
        self.code = code


def kling_rejection(status: int, code: int, message: str) -> Rejection:
    return Rejection(status, kling_error(code, message), code)


def check_duplicate_policy(policy: object) -> DuplicatePolicy:
    if policy == "reject" or policy == "return_first" or policy == "allow":
        return policy
    raise ValueError(
        f"duplicate_external_id must be one of {', '.join(DUPLICATE_POLICIES)}, got {policy!r}"
    )


def check_visibility_lag(lag: object) -> float:
    if isinstance(lag, bool) or not isinstance(lag, int | float):
        raise TypeError(f"visibility_lag must be a number of emulated seconds, got {lag!r}")
    if not (lag >= 0 and math.isfinite(lag)):
        raise ValueError(f"visibility_lag must be a finite number >= 0, got {lag!r}")
    return float(lag)


@attrs.define
class Settings:
    """What a test may change while the emulator runs (and the fixed behaviour switches)."""

    concurrency_limit: int | None
    forced_account_error: int | None
    duplicate_external_id: DuplicatePolicy
    unknown_task: UnknownTaskStyle
    #: Bytes per real second a file is served at (None: at once), so a test can catch a client
    #: in the middle of a download.
    download_rate: float | None = None
    #: Emulated seconds a task created from now on stays hidden from lookups by external id and
    #: from the list (a GET by task id sees it at once).
    visibility_lag: float = 0.0
    #: Whether the ``/kling`` family serves the list and the external-id lookups, which CometAPI
    #: does not document.
    cometapi_lookups: bool = True


def count_error(stats: EmulatorStats, code: int | None) -> None:
    """Count a Kling-envelope error answer in the ground truth."""
    if code is None:
        return
    stats.sent_errors[code] += 1
    if code == 1302:
        stats.sent_1302 += 1
    elif code == 1303:
        stats.sent_1303 += 1


def json_response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=dumps(body), content_type="application/json")


def before_commit(fault: FaultKind, faults: FaultInjector, stats: EmulatorStats) -> web.Response:
    """The answer of a fault that strikes before any work (the API's and the file origin's)."""
    stats.faults_injected[fault.value] += 1
    if fault is FaultKind.HTML_502:
        return web.Response(status=502, text=_BAD_GATEWAY_HTML, content_type="text/html")
    if fault is FaultKind.COMETAPI_ERROR_ENVELOPE:
        body = cometapi_error("Upstream request failed, please retry", "invalid_request")
        return json_response(500, body)
    status, code, message = faults.server_error()
    count_error(stats, code)
    return json_response(status, kling_error(code, message))


def request_host(request: web.Request) -> str | None:
    """The host name the client used to reach us (from ``Host``), or None if there is none.

    Result URLs go to the same name, so a client that reached the API as ``localhost`` gets
    file URLs on ``localhost``, one that used ``127.0.0.1`` gets ``127.0.0.1``: a client that
    trusts "the API's own host" for downloads then works whichever name it was given.
    """
    try:
        host = request.url.host
    except ValueError:
        return None
    return host.lower() if host else None


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@web.middleware
async def _kling_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and methods answer in the Kling envelope (404/1203, 404/1202)."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        body = kling_error(1202, f"Invalid method {request.method} for {request.path}")
        return web.Response(status=404, text=dumps(body), content_type="application/json")
    except web.HTTPNotFound:
        body = kling_error(1203, f"Resource not found: {request.path}")
        return web.Response(status=404, text=dumps(body), content_type="application/json")


class KlingServer:
    """Request handlers over the emulator's state."""

    def __init__(
        self,
        *,
        seed: int,
        clock: EmulatedClock,
        store: TaskStore,
        stats: EmulatorStats,
        auth: Authenticator,
        faults: FaultInjector,
        limiter: TokenBucket | None,
        callbacks: CallbackScheduler,
        links: VideoLinks,
        settings: Settings,
        closing: asyncio.Event,
        persist: StateFile | None = None,
    ) -> None:
        self._seed = seed
        self._persist = persist
        self._clock = clock
        self._store = store
        self._stats = stats
        self._auth = auth
        self._faults = faults
        self._limiter = limiter
        self._callbacks = callbacks
        self._links = links
        self._settings = settings
        self._closing = closing

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_kling_not_found])
        for prefix in ("/v1", "/kling/v1"):
            app.router.add_post(f"{prefix}/videos/text2video", self._create)
            app.router.add_get(f"{prefix}/videos/text2video", self._query_collection)
            app.router.add_get(f"{prefix}/videos/text2video/{{task_id}}", self._query_one)
        return app

    def render(self, task: EmulatedTask, at: float, host: str | None = None) -> dict[str, Any]:
        """The task object as of ``at``, with freshly signed video URLs on ``host``."""
        return task_object(task, at, self._clock, lambda video_id: self._links.url(video_id, host))

    # -- gates -------------------------------------------------------------------------------

    def _admit(self, request: web.Request) -> AuthMode:
        """Rate limit, then authentication; raises :class:`Rejection`."""
        if self._limiter is not None and not self._limiter.try_acquire():
            raise kling_rejection(
                429, 1302, "Too many requests: the request rate is over the limit"
            )
        try:
            mode = self._auth.verify(
                request.headers.get("Authorization"),
                cometapi_family=request.path.startswith("/kling/"),
            )
        except AuthError as exc:
            if exc.cometapi_code is not None:
                raise Rejection(401, cometapi_error(exc.message, exc.cometapi_code), None) from None
            raise kling_rejection(401, exc.code, exc.message) from None
        finally:
            self._stats.tokens_seen = self._auth.tokens_seen
        return mode

    # -- answers -----------------------------------------------------------------------------

    def _rejected(self, rejection: Rejection) -> web.Response:
        count_error(self._stats, rejection.code)
        return json_response(rejection.status, rejection.body)

    def _before_commit(self, fault: FaultKind) -> web.Response:
        return before_commit(fault, self._faults, self._stats)

    async def _send(
        self,
        request: web.Request,
        status: int,
        body: dict[str, Any],
        fault: FaultKind | None,
        code: int | None = None,
    ) -> web.StreamResponse:
        """Send a computed answer, through an after-commit fault if one was drawn."""
        text = dumps(body)
        if fault in AFTER_COMMIT:
            assert fault is not None
            self._stats.faults_injected[fault.value] += 1
            if fault is FaultKind.DROP_AFTER_COMMIT:
                return drop(request)
            if fault is FaultKind.STALL_AFTER_COMMIT:
                await stall(self._faults.stall_seconds, self._closing)
            elif fault is FaultKind.TRUNCATED_JSON:
                text = text[: len(text) // 2]
        count_error(self._stats, code)
        return web.Response(status=status, text=text, content_type="application/json")

    # -- create ------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self._stats.requests_per_route["create"] += 1
        try:
            mode = self._admit(request)
            fault = self._faults.draw("create")
            if fault in BEFORE_COMMIT:
                assert fault is not None
                return self._before_commit(fault)
            task = await self._commit(request, mode)
            await self._durable(task)
        except Rejection as rejection:
            return self._rejected(rejection)
        now = self._clock.now()
        return await self._send(request, 200, success(created(task, now, self._clock)), fault)

    async def _durable(self, task: EmulatedTask) -> None:
        """Return once ``task`` is synced to the state file (at once without one).

        The answer waits for it, so a client told about a task never loses it to a crash; a
        failed write answers 500/5000, the ambiguous outcome a client must already handle (the
        row stays queued and goes out with the next write).
        """
        if self._persist is None:
            return
        try:
            await self._persist.saved(task)
        except Exception:
            logger.exception("could not write task %s to the state file", task.task_id)
            raise kling_rejection(500, 5000, "Internal server error") from None

    async def _commit(self, request: web.Request, mode: AuthMode) -> EmulatedTask:
        forced = self._settings.forced_account_error
        if forced is not None:
            status, message = ACCOUNT_ERRORS[forced]
            raise kling_rejection(status, forced, message)
        try:
            body = json.loads(await request.read(), parse_constant=_reject_json_constant)
        except ValueError as exc:
            raise kling_rejection(
                400, 1200, f"Invalid request: the body is not JSON ({exc})"
            ) from None
        try:
            params = parse_create(body, COMETAPI if mode is AuthMode.API_KEY else OFFICIAL)
        except InvalidRequest as exc:
            raise kling_rejection(400, exc.code, exc.message) from None

        external_task_id = params.external_task_id
        if external_task_id is not None:
            existing = self._store.by_external_id(external_task_id)
            policy = self._settings.duplicate_external_id
            if existing is not None and policy == "reject":
                raise kling_rejection(
                    400,
                    1201,
                    f"external_task_id {external_task_id!r} already exists "
                    f"(task {existing.task_id}); it must be unique per account",
                )
            if existing is not None and policy == "return_first":
                return existing

        now = self._clock.now()
        active = self._store.active_count(now)
        limit = self._settings.concurrency_limit
        if limit is not None and active >= limit:
            raise kling_rejection(429, 1303, "parallel task over resource pack limit")

        task = self._store.create(
            now=now,
            model_name=params.model_name,
            mode=params.mode,
            duration=params.duration,
            aspect_ratio=params.aspect_ratio,
            external_task_id=external_task_id,
            callback_url=params.callback_url,
            request=params.body,
            visibility_lag=self._settings.visibility_lag,
        )
        if self._persist is not None:
            self._persist.queue(task)
        stats = self._stats
        stats.tasks_created += 1
        if external_task_id is not None:
            stats.created_per_external_id[external_task_id] += 1
        stats.peak_active = max(stats.peak_active, active + task.is_active(now))
        self._callbacks.schedule(task)
        return task

    # -- queries -----------------------------------------------------------------------------

    def _not_found(self, what: str) -> Rejection:
        style = self._settings.unknown_task
        if style == "kling_1203":
            return kling_rejection(404, 1203, f"Task not found: {what}")
        if style == "new_api":
            return Rejection(400, {"code": "task_not_exist", "message": "task_not_exist"}, None)
        return kling_rejection(400, 1201, "Task not found")

    def _one(self, task: EmulatedTask | None, what: str, host: str | None) -> dict[str, Any]:
        if task is None:
            raise self._not_found(what)
        return success(self.render(task, self._clock.now(), host))

    def _by_id(self, task_id: str, host: str | None) -> dict[str, Any]:
        return self._one(self._store.get(task_id), task_id, host)

    def _by_external_id(self, external_task_id: str, host: str | None) -> dict[str, Any]:
        task = self._store.find_external(external_task_id, self._clock.now())
        return self._one(task, f"external_task_id {external_task_id}", host)

    def _page(self, query: Mapping[str, str], host: str | None) -> dict[str, Any]:
        page_num = _page_param(query, "pageNum", 1, PAGE_NUM_MAX)
        page_size = _page_param(query, "pageSize", PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        now = self._clock.now()
        tasks = self._store.newest_first(page_num, page_size, now)
        return success([self.render(task, now, host) for task in tasks])

    def _lookups_served(self, request: web.Request) -> bool:
        """Whether this request's family serves the list and external-id lookups."""
        return self._settings.cometapi_lookups or not request.path.startswith("/kling/")

    def _invalid_url(self, request: web.Request, route: str) -> web.Response:
        """What CometAPI's gateway answers for a route it does not have (before any auth)."""
        self._stats.requests_per_route[route] += 1
        message = f"Invalid URL ({request.method} {request.path})"
        return json_response(404, cometapi_error(message, "invalid_url"))

    async def _query(
        self, request: web.Request, route: str, answer: Callable[[], dict[str, Any]]
    ) -> web.StreamResponse:
        self._stats.requests_per_route[route] += 1
        try:
            self._admit(request)
        except Rejection as rejection:
            return self._rejected(rejection)
        fault = self._faults.draw("query")
        if fault in BEFORE_COMMIT:
            assert fault is not None
            return self._before_commit(fault)
        try:
            return await self._send(request, 200, answer(), fault)
        except Rejection as rejection:
            return await self._send(
                request, rejection.status, rejection.body, fault, rejection.code
            )

    async def _query_one(self, request: web.Request) -> web.StreamResponse:
        """``GET .../text2video/{id}``: a task id, else an external id (protocol 1.1).

        Without lookups (``/kling`` with ``cometapi_lookups=False``) ``{id}`` is a task id only.
        """
        ident = request.match_info["task_id"]
        host = request_host(request)
        store = self._store
        if self._lookups_served(request):
            by_external_id = request.query.get("external_task_id", "").lower() == "true"
            if by_external_id or (
                ident not in store.tasks and store.by_external_id(ident) is not None
            ):
                return await self._query(
                    request, "get_by_external_id", lambda: self._by_external_id(ident, host)
                )
        return await self._query(request, "get", lambda: self._by_id(ident, host))

    async def _query_collection(self, request: web.Request) -> web.StreamResponse:
        """``GET .../text2video``: the list, or a lookup with ``?external_task_id=X``."""
        external_task_id = request.query.get("external_task_id")
        route = "list" if external_task_id is None else "get_by_external_id"
        if not self._lookups_served(request):
            return self._invalid_url(request, route)
        host = request_host(request)
        if external_task_id is not None:
            return await self._query(
                request, route, lambda: self._by_external_id(external_task_id, host)
            )
        return await self._query(request, route, lambda: self._page(request.query, host))


def _page_param(query: Mapping[str, str], name: str, default: int, upper: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= upper:
        raise kling_rejection(400, 1201, f"{name} must be an integer in [1, {upper}], got {raw!r}")
    return value
