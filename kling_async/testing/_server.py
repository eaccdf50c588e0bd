"""The HTTP face of the emulator: routes, the order of checks, and fault delivery.

Every API request goes through the same gates in the same order a real gateway applies them:
rate limit (1302), authentication (401), then a fault draw (so a fault hits only a request the
server would have processed), then the route's own work. Handlers are thin; the shapes live in
``_wire``, the rules in ``_validation`` and ``_auth``, the tasks in ``_state``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import anyio
import attrs
from aiohttp import web
from aiohttp.typedefs import Handler

from ._auth import Authenticator, AuthError, AuthMode
from ._callbacks import CallbackScheduler
from ._clock import EmulatedClock
from ._faults import AFTER_COMMIT, BEFORE_COMMIT, FaultInjector, FaultKind
from ._ratelimit import TokenBucket
from ._state import EmulatedTask, EmulatorStats, TaskStore
from ._validation import COMETAPI, OFFICIAL, InvalidRequest, parse_create
from ._video import VideoLinks, video_bytes
from ._wire import cometapi_error, created, dumps, kling_error, success, task_object

DuplicatePolicy = Literal["reject", "return_first", "allow"]
UnknownTaskStyle = Literal["kling_1201", "kling_1203", "new_api"]

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


@attrs.define
class Settings:
    """What a test may change while the emulator runs."""

    concurrency_limit: int | None
    forced_account_error: int | None
    duplicate_external_id: DuplicatePolicy
    unknown_task: UnknownTaskStyle
    #: Bytes per real second a file is served at (None: at once), so a test can catch a client
    #: in the middle of a download.
    download_rate: float | None = None


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
    ) -> None:
        self._seed = seed
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
        app.router.add_get("/files/{video_id}.mp4", self._download)
        return app

    def render(self, task: EmulatedTask, at: float) -> dict[str, Any]:
        """The task object as of ``at``, with freshly signed video URLs."""
        return task_object(task, at, self._clock, self._links.url)

    # -- gates -------------------------------------------------------------------------------

    def _admit(self, request: web.Request) -> AuthMode:
        """Rate limit, then authentication; raises :class:`Rejection`."""
        if self._limiter is not None and not self._limiter.try_acquire():
            raise kling_rejection(
                429, 1302, "Too many requests: the request rate is over the limit"
            )
        try:
            grant = self._auth.verify(
                request.headers.get("Authorization"),
                cometapi_family=request.path.startswith("/kling/"),
            )
        except AuthError as exc:
            if exc.cometapi_code is not None:
                raise Rejection(401, cometapi_error(exc.message, exc.cometapi_code), None) from None
            raise kling_rejection(401, exc.code, exc.message) from None
        finally:
            self._stats.tokens_seen = self._auth.tokens_seen
        return grant.mode

    # -- answers -----------------------------------------------------------------------------

    def _count_error(self, code: int | None) -> None:
        if code is None:
            return
        self._stats.sent_errors[code] += 1
        if code == 1302:
            self._stats.sent_1302 += 1
        elif code == 1303:
            self._stats.sent_1303 += 1

    def _rejected(self, rejection: Rejection) -> web.Response:
        self._count_error(rejection.code)
        return web.Response(
            status=rejection.status, text=dumps(rejection.body), content_type="application/json"
        )

    def _before_commit(self, fault: FaultKind) -> web.Response:
        self._stats.faults_injected[fault.value] += 1
        if fault is FaultKind.HTML_502:
            return web.Response(status=502, text=_BAD_GATEWAY_HTML, content_type="text/html")
        if fault is FaultKind.COMETAPI_ERROR_ENVELOPE:
            body = cometapi_error("Upstream request failed, please retry", "invalid_request")
            return web.Response(status=500, text=dumps(body), content_type="application/json")
        status, code, message = self._faults.server_error()
        return self._rejected(kling_rejection(status, code, message))

    def _drop(
        self, request: web.Request, response: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        """Close the connection without (the rest of) an answer.

        Closing the transport and then returning a response is the clean way in aiohttp: writing
        that response fails with a ConnectionError, which the server treats as a premature client
        disconnect (a debug log line at most). Raising from the handler instead would log an
        error and try to send a 500. ``close()`` (not ``abort()``) flushes what was already
        written, so a cut download really delivers its first part.
        """
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=204) if response is None else response

    async def _stall(self) -> None:
        """Wait ``stall_seconds`` real seconds, or until the emulator closes."""
        with anyio.move_on_after(self._faults.stall_seconds):
            await self._closing.wait()

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
                return self._drop(request)
            if fault is FaultKind.STALL_AFTER_COMMIT:
                await self._stall()
            elif fault is FaultKind.TRUNCATED_JSON:
                text = text[: len(text) // 2]
        self._count_error(code)
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
        except Rejection as rejection:
            return self._rejected(rejection)
        now = self._clock.now()
        return await self._send(request, 200, success(created(task, now, self._clock)), fault)

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
        )
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

    def _one(self, task: EmulatedTask | None, what: str) -> dict[str, Any]:
        if task is None:
            raise self._not_found(what)
        return success(self.render(task, self._clock.now()))

    def _page(self, query: Mapping[str, str]) -> dict[str, Any]:
        page_num = _page_param(query, "pageNum", 1, PAGE_NUM_MAX)
        page_size = _page_param(query, "pageSize", PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        now = self._clock.now()
        tasks = self._store.newest_first(page_num, page_size)
        return success([self.render(task, now) for task in tasks])

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
        """``GET .../text2video/{id}``: a task id, else an external id (protocol 1.1)."""
        ident = request.match_info["task_id"]
        store = self._store
        by_external_id = request.query.get("external_task_id", "").lower() == "true"
        if by_external_id or (ident not in store.tasks and store.by_external_id(ident) is not None):
            return await self._query(
                request,
                "get_by_external_id",
                lambda: self._one(store.by_external_id(ident), f"external_task_id {ident}"),
            )
        return await self._query(
            request,
            "get",
            lambda: self._one(store.tasks.get(ident) or store.by_external_id(ident), ident),
        )

    async def _query_collection(self, request: web.Request) -> web.StreamResponse:
        """``GET .../text2video``: the list, or a lookup with ``?external_task_id=X``."""
        external_task_id = request.query.get("external_task_id")
        if external_task_id is not None:
            found = self._store.by_external_id
            return await self._query(
                request,
                "get_by_external_id",
                lambda: self._one(found(external_task_id), f"external_task_id {external_task_id}"),
            )
        return await self._query(request, "list", lambda: self._page(request.query))

    # -- files -------------------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A result file. No auth, like a CDN's hotlink-protected URL: the signature is the key."""
        self._stats.requests_per_route["download"] += 1
        fault = self._faults.draw("download")
        if fault in BEFORE_COMMIT:
            assert fault is not None
            return self._before_commit(fault)
        video_id = request.match_info["video_id"]
        owner = self._store.video_owner(video_id)
        if owner is None or owner.status_at(self._clock.now()) != "succeed":
            return web.Response(status=404, text="404 Not Found: no such file\n")
        if not self._links.allows(video_id, request.query):
            return web.Response(
                status=403, text="403 Forbidden: the URL expired or its signature is invalid\n"
            )
        data = video_bytes(self._seed, video_id)
        if fault is not None:
            self._stats.faults_injected[fault.value] += 1
        if fault is FaultKind.DROP_AFTER_COMMIT:
            return self._drop(request)
        if fault is FaultKind.STALL_AFTER_COMMIT:
            await self._stall()
        if fault is FaultKind.DROP_MID_DOWNLOAD:
            response = web.StreamResponse(status=200, headers={"Content-Type": "video/mp4"})
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            return self._drop(request, response)
        if self._settings.download_rate is not None:
            return await self._trickle(request, data, self._settings.download_rate)
        return web.Response(body=data, content_type="video/mp4")

    async def _trickle(self, request: web.Request, data: bytes, rate: float) -> web.StreamResponse:
        """Serve ``data`` at ``rate`` bytes per real second, in twentieths of a second."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "video/mp4"})
        response.content_length = len(data)
        await response.prepare(request)
        step = max(1, int(rate / 20))
        try:
            for start in range(0, len(data), step):
                await response.write(data[start : start + step])
                with anyio.move_on_after(step / rate):
                    await self._closing.wait()
                if self._closing.is_set():
                    return self._drop(request, response)
        except ConnectionError:
            return response  # the client went away mid-file: nothing more to do
        await response.write_eof()
        return response


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
