"""Hostile servers on loopback, for the tests (and benchmarks) of what the SDK must not trust.

:class:`HostileServer` is a real ``aiohttp.web`` server that plays a misbehaving Kling API (it
echoes every request header, the ``Authorization`` header included, into its error answers) and
a misbehaving file host (HTML or JSON where a video should be, bodies that trickle or stall, a
"loopback service" that must never be reached, redirects anywhere). :class:`GarbageHTTPServer`
answers with bytes that are not HTTP at all, echoing the request, which makes aiohttp raise the
errors that carry the request's headers. Both bind 127.0.0.1 only and count what reached them.
"""

from __future__ import annotations

import asyncio
import struct
import traceback
from collections import Counter
from types import TracebackType
from typing import Literal, Self

import anyio
from aiohttp import web

ApiMode = Literal[
    "kling_400",
    "kling_401",
    "html_500",
    "cometapi_500",
    "not_a_task",
    "failed_task",
    "ignores_lookups",
    "id_rule_400",
    "task",
]

#: A tiny, valid-looking MP4 head: an ``ftyp`` box, then an ``mdat`` box of filler.
MP4_BYTES = (
    struct.pack(">I4s4sI", 24, b"ftyp", b"isom", 0x200)
    + b"isomavc1"
    + struct.pack(">I4s", 8 + 64, b"mdat")
    + bytes(64)
)


def _headers_text(request: web.Request) -> str:
    return "; ".join(f"{name}: {value}" for name, value in request.headers.items())


class HostileServer:
    """``async with HostileServer() as hostile:`` then ``hostile.url``, ``hostile.hits``.

    ``api_mode`` picks what the API routes answer; ``trickle_interval`` is the real seconds
    between the bytes of ``/trickle``; ``task_url`` is the video URL ``task`` mode hands out.
    """

    def __init__(self, *, api_mode: ApiMode = "kling_400", trickle_interval: float = 2.0) -> None:
        self.api_mode: ApiMode = api_mode
        self.trickle_interval = trickle_interval
        self.task_url = ""
        self.hits: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/v1/videos/text2video", self._api)
        app.router.add_route("*", "/v1/videos/text2video/{task_id}", self._api)
        app.router.add_get("/secret", self._secret)
        app.router.add_get("/html", self._html)
        app.router.add_get("/json", self._json)
        app.router.add_get("/notmp4", self._not_mp4)
        app.router.add_get("/mp4", self._mp4)
        app.router.add_get("/trickle", self._trickle)
        app.router.add_get("/stall", self._stall)
        app.router.add_get("/redirect", self._redirect)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    # --- a hostile API ----------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        self.hits["api"] += 1
        await request.read()
        echoed = _headers_text(request)
        mode = self.api_mode
        if mode == "kling_400":
            body = {
                "code": 1201,
                "message": f"bad request; you sent {echoed}",
                "request_id": echoed,
            }
            return web.json_response(body, status=400)
        if mode == "kling_401":
            body = {"code": 1000, "message": f"who is {echoed}?", "request_id": "r-1"}
            return web.json_response(body, status=401)
        if mode == "html_500":
            return web.Response(
                status=500,
                text=f"<html><body>oops {echoed}</body></html>",
                content_type="text/html",
            )
        if mode == "cometapi_500":
            error = {"message": f"upstream said {echoed}", "type": "comet_api_error", "code": ""}
            return web.json_response({"error": error}, status=500)
        if mode == "not_a_task":
            body = {"code": 0, "message": "SUCCEED", "data": {"echo": echoed}}
            return web.json_response(body)
        if mode == "ignores_lookups":
            # Creates fail with a 5xx (their outcome unknown); every GET gets a list page of
            # someone else's task, whatever was asked (a gateway ignoring ?external_task_id=).
            self.hits["api_" + request.method] += 1
            if request.method == "POST":
                body = {"code": 5000, "message": "Internal server error", "request_id": "r"}
                return web.json_response(body, status=500)
            other = self._task("100000000000000009", "succeed", "")
            other["task_info"] = {"external_task_id": "someone-else"}
            return web.json_response({"code": 0, "message": "SUCCEED", "data": [other]})
        if mode == "id_rule_400":
            # A refusal that names the field without saying it is taken; lookups find nothing.
            self.hits["api_" + request.method] += 1
            if request.method == "POST":
                message = "external_task_id is invalid: at most 32 characters"
            else:
                message = "Task not found"
            body = {"code": 1201, "message": message, "request_id": "r"}
            return web.json_response(body, status=400)
        if mode == "failed_task":
            task = self._task(request.match_info.get("task_id", "1"), "failed", echoed)
            return web.json_response({"code": 0, "message": "SUCCEED", "data": task})
        task = self._task(request.match_info.get("task_id", "100000000000000001"), "succeed", "")
        return web.json_response({"code": 0, "message": "SUCCEED", "data": task})

    def _task(self, task_id: str, status: str, message: str) -> dict[str, object]:
        videos = [{"id": "v1", "url": self.task_url, "duration": "5.0"}]
        return {
            "task_id": task_id,
            "task_status": status,
            "task_status_msg": message,
            "task_info": {},
            "task_result": {"videos": videos} if status == "succeed" else {},
            "created_at": 1774711071284,
            "updated_at": 1774711071284,
        }

    # --- a hostile file host ----------------------------------------------------------------

    async def _secret(self, _request: web.Request) -> web.Response:
        self.hits["secret"] += 1
        return web.Response(body=MP4_BYTES, content_type="video/mp4")

    async def _html(self, _request: web.Request) -> web.Response:
        self.hits["html"] += 1
        return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")

    async def _json(self, _request: web.Request) -> web.Response:
        self.hits["json"] += 1
        return web.json_response({"error": "expired"})

    async def _not_mp4(self, _request: web.Request) -> web.Response:
        self.hits["notmp4"] += 1
        return web.Response(body=b"GIF89a" + bytes(200), content_type="video/mp4")

    async def _mp4(self, _request: web.Request) -> web.Response:
        self.hits["mp4"] += 1
        return web.Response(body=MP4_BYTES, content_type="video/mp4")

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        """One byte every ``trickle_interval`` seconds: never silent long enough to time out."""
        self.hits["trickle"] += 1
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = len(MP4_BYTES)
        await response.prepare(request)
        try:
            for index in range(len(MP4_BYTES)):
                await response.write(MP4_BYTES[index : index + 1])
                with anyio.move_on_after(self.trickle_interval):
                    await self._closing.wait()
                if self._closing.is_set():
                    break
        except ConnectionError:
            pass
        return response

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        """Headers and the first bytes, then silence until the server closes."""
        self.hits["stall"] += 1
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = len(MP4_BYTES)
        await response.prepare(request)
        try:
            await response.write(MP4_BYTES[:16])
            await self._closing.wait()
        except ConnectionError:
            pass
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        self.hits["redirect"] += 1
        raise web.HTTPFound(request.query["to"])


class GarbageHTTPServer:
    """Answers every connection with a status line that is not HTTP, echoing the request (its
    ``Authorization`` header included) into it; aiohttp then raises errors that carry the
    request's headers. ``connections`` counts who came."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            echoed = head.decode("latin-1").replace("\r\n", " | ")
            writer.write(f"HTTP/1.1 ABC {echoed}\r\nX-Echo: {echoed}\r\n\r\n".encode("latin-1"))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception reachable from it: causes, contexts, group members."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        current = stack.pop()
        if any(current is known for known in seen):
            continue
        seen.append(current)
        stack += [link for link in (current.__cause__, current.__context__) if link is not None]
        if isinstance(current, BaseExceptionGroup):
            stack += list(current.exceptions)
    return seen


def texts_of(exc: BaseException) -> list[str]:
    """Every text an exception can end up as: its formatted traceback, and the str, repr,
    arguments and attributes of each exception in its chain."""
    texts = ["".join(traceback.format_exception(exc))]
    for link in exception_chain(exc):
        texts += [str(link), repr(link), repr(link.args), repr(vars(link))]
    return texts
