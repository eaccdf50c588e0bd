"""Helpers for the tests of ``kling_async.fastapi``: the real app over real HTTP.

:func:`kling_app` builds a FastAPI app with ``kf.lifespan(...)`` and ``kf.router(...)`` against
an :class:`~kling_async.testing.Emulator` and serves it with a real ``uvicorn.Server`` on
127.0.0.1, in a task group of the test's own: it yields once the server has started, and stops
it gracefully (``should_exit``, then the lifespan's shutdown) whatever the test did, so the
client inside is closed before the test ends. :func:`sse_items` reads Server-Sent Events over
aiohttp the way a browser's ``EventSource`` does, comments included (they are the heartbeats).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import aiohttp
import anyio
import uvicorn
from aiohttp import web
from fastapi import FastAPI

import kling_async as ka
import kling_async.fastapi as kf
from kling_async.testing import Emulator

from .conftest import FAST_RETRY

T = TypeVar("T")

#: Where the tests mount the router.
PREFIX = "/kling"
STARTUP_TIMEOUT = 15.0
#: Open streams get this long to end when a server stops (then they are cancelled).
GRACEFUL_SHUTDOWN = 5


class StartupFailed(Exception):
    """uvicorn gave up starting the app (its lifespan raised); ``uvicorn.error`` says why."""


def bound_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1 (port 0: a free one), not listening yet. Bound here,
    not by uvicorn, so the port is known before the app is built (its ``public_url``) and
    no other process can take it in between; ``SO_REUSEADDR`` lets a restarted app bind
    the same port again. ``IPPROTO_TCP`` named: asyncio sets ``TCP_NODELAY`` only on sockets
    that say so, and without it every answer waits 40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """A test's failure inside the server's task group, raised as itself (not as a group of
    one): the report shows the assertion first."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def serving(app: Any, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on ``sock`` (default: a free 127.0.0.1 port) and yield
    ``http://127.0.0.1:<port>`` once it has started; :class:`StartupFailed` if it does not
    (uvicorn exits with ``SystemExit(3)`` when the lifespan raises)."""
    sock = bound_socket() if sock is None else sock
    port = port_of(sock)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        # The tests' logging stays pytest's: no dictConfig of uvicorn's own handlers.
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )
    server = uvicorn.Server(config)
    ended = anyio.Event()
    exit_codes: list[object] = []

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as stop:  # a failed startup
            exit_codes.append(stop.code)
        finally:
            ended.set()

    try:
        async with _unwrapped(), anyio.create_task_group() as group:
            group.start_soon(serve, name=f"uvicorn-{port}")
            with anyio.fail_after(STARTUP_TIMEOUT):
                while not server.started and not ended.is_set():
                    await anyio.sleep(0.005)
            if server.started:
                try:
                    yield f"http://127.0.0.1:{port}"
                finally:
                    # Graceful, even when the test failed: the lifespan closes the client.
                    server.should_exit = True
                    with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                        await ended.wait()
    finally:
        sock.close()
    if not server.started:
        raise StartupFailed(f"uvicorn did not start the app (exit code {exit_codes})")


def client_options(emu: Emulator, **overrides: Any) -> dict[str, Any]:
    """Client options for ``kf.lifespan``, tuned to the emulator's clock (as ``client_for``)."""
    options: dict[str, Any] = {
        "api_key": emu.api_key,
        "base_url": emu.url,
        "poll": ka.PollPolicy().scaled(emu.time_scale),
        "retry": FAST_RETRY,
        "settle_window": 0.2,
        "timeout": 2.0,
        "max_requests_per_second": None,
    }
    options.update(overrides)
    return options


class Served(NamedTuple):
    """A running app: ``url`` is where the router is mounted (``http://127.0.0.1:p/kling``)."""

    url: str
    app: FastAPI

    @property
    def root(self) -> str:
        return self.url.removesuffix(PREFIX)


@asynccontextmanager
async def kling_app(
    emu: Emulator,
    *,
    router_options: Mapping[str, Any] | None = None,
    push: bool = True,
    include_router: bool = True,
    with_lifespan: bool = True,
    sock: socket.socket | None = None,
    routes: Callable[[FastAPI], None] | None = None,
    **options: Any,
) -> AsyncIterator[Served]:
    """``FastAPI(lifespan=kf.lifespan(**options))`` with ``kf.router(**router_options)`` under
    :data:`PREFIX`, served on 127.0.0.1. ``options`` are the lifespan's (``callback_token``,
    ``download_dir``, ``app_lifespan``...) and the client's, over :func:`client_options`;
    ``push`` sets ``public_url`` to the app's own address, so the emulator calls back.
    ``routes`` adds the app's own routes."""
    sock = bound_socket() if sock is None else sock
    settings = client_options(emu, **options)
    if push:
        settings.setdefault("public_url", f"http://127.0.0.1:{port_of(sock)}")
    try:
        app = FastAPI(lifespan=kf.lifespan(**settings) if with_lifespan else None)
    except BaseException:
        sock.close()  # refused before serving: the socket is not handed to the server
        raise
    if include_router:
        app.include_router(kf.router(**dict(router_options or {})), prefix=PREFIX)
    if routes is not None:
        routes(app)
    async with serving(app, sock) as root:
        yield Served(root + PREFIX, app)


# --- Server-Sent Events -----------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event: its ``data:`` lines joined, and its ``id:``, ``event:``,
    ``retry:`` fields as sent (None when absent)."""

    data: str
    id: str | None = None
    event: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class SseComment:
    """A comment line (``: text``): ignored by ``EventSource``, sent as a heartbeat."""

    text: str


SseItem = SseEvent | SseComment


async def sse_items(response: aiohttp.ClientResponse) -> AsyncIterator[SseItem]:
    """The events and comments of a ``text/event-stream`` body, as they arrive, until it
    closes. An event is dispatched at the blank line that ends it (the stream format of the
    HTML standard: ``field: value`` with one optional space, lines ending in LF or CR LF); a
    comment is reported at once."""
    data: list[str] = []
    fields: dict[str, str] = {}
    async for raw in response.content:  # one line at a time, with its line ending
        line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        if line == "":
            if data or fields:
                retry = fields.get("retry")
                yield SseEvent(
                    data="\n".join(data),
                    id=fields.get("id"),
                    event=fields.get("event"),
                    retry=int(retry) if retry is not None and retry.isdigit() else None,
                )
            data, fields = [], {}
        elif line.startswith(":"):
            yield SseComment(line[1:].removeprefix(" "))
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name in ("id", "event", "retry"):
                fields[name] = value


def events_only(items: list[SseItem]) -> list[SseEvent]:
    return [item for item in items if isinstance(item, SseEvent)]


def event_number(event_id: str | None) -> tuple[str, int]:
    """``<epoch>-<n>`` -> ``(epoch, n)``."""
    assert event_id is not None, "an event without an id"
    epoch, sep, number = event_id.partition("-")
    assert sep and epoch and number.isdigit(), event_id
    return epoch, int(number)


# --- polling with a deadline ------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float = 10.0, interval: float = 0.01
) -> T:
    """Await ``check()`` until it gives something other than None (or False), within
    ``within`` seconds."""
    with anyio.fail_after(within):
        while True:
            found = await check()
            if found is not None and found is not False:
                return found
            await anyio.sleep(interval)


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def job_view(session: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    status, view = await get_json(session, f"{base}/jobs/{job_id}")
    assert status == 200, (status, view)
    assert isinstance(view, dict)
    return view


async def wait_for_status(
    session: aiohttp.ClientSession,
    base: str,
    job_id: str,
    statuses: set[str] | frozenset[str],
    *,
    within: float = 20.0,
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until the job's status is one of ``statuses``."""

    async def check() -> dict[str, Any] | None:
        view = await job_view(session, base, job_id)
        return view if view["status"] in statuses else None

    return await eventually(check, within=within, interval=0.02)


DONE = frozenset({"succeed", "failed", "error"})


# --- logs -------------------------------------------------------------------------------------


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def recorded(*names: str, level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Every record the named loggers handle (after their filters), at ``level`` and up:
    a handler on each logger itself, since uvicorn's may not propagate to pytest's."""
    keep = _Keep()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(keep)
        logger.setLevel(level)
    try:
        yield keep.records
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.removeHandler(keep)
            logger.setLevel(old)


def wire_task(
    task_id: str,
    status: str,
    *,
    external_task_id: str | None = None,
    video_url: str | None = None,
    message: str = "",
) -> dict[str, Any]:
    """A bare task object in Kling's wire format, as a callback carries it."""
    body: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "task_status_msg": message,
        "created_at": 1_700_000_000_000,
        "updated_at": 1_700_000_060_000,
    }
    if external_task_id is not None:
        body["task_info"] = {"external_task_id": external_task_id}
    if video_url is not None:
        body["task_result"] = {"videos": [{"id": "v-1", "url": video_url, "duration": "5"}]}
    return body


# --- a Kling that refuses ---------------------------------------------------------------------


@asynccontextmanager
async def refusing_kling(message: Callable[[Mapping[str, Any]], str]) -> AsyncIterator[str]:
    """A Kling on 127.0.0.1 that refuses every create with a 1201 whose message is
    ``message(body)`` (a server quoting what it got, or not); yields its base URL."""

    async def create(request: web.Request) -> web.Response:
        text = message(await request.json())
        return web.json_response({"code": 1201, "message": text, "request_id": "req-1"}, status=400)

    app = web.Application()
    app.router.add_post("/v1/videos/text2video", create)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
