"""The file origin: a second listening port that serves result videos, as a CDN would.

Real result URLs point at a CDN host, not at the API: a client that sends its API credentials
along with a download, or that assumes files live under the API's base URL, must fail here as it
would there. So files are served from their own port (plain HTTP, or HTTPS with the shipped
self-signed certificate), with no auth (the URL's signature is the key), ``Range`` requests for
resumable downloads, ``HEAD``, and the download faults.

Ranges follow RFC 9110 section 14 for a single range (``bytes=a-b``, ``bytes=a-``,
``bytes=-n``): 206 with ``Content-Range``, 416 when nothing of it is in the file. A header that
is not a valid byte range set is ignored (200 with the whole file), as the RFC says; a valid set
of several ranges is answered 200 with the whole file too, which the RFC allows and spares the
emulator multipart bodies. ``If-Range`` with anything but the file's ETag also gets the whole
file, so a client resuming a download it started elsewhere cannot splice two files.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Final

import anyio
from aiohttp import web
from aiohttp.typedefs import Handler

from ._clock import EmulatedClock
from ._conn import drop, stall
from ._faults import BEFORE_COMMIT, FaultInjector, FaultKind
from ._server import Settings, before_commit
from ._state import EmulatorStats, TaskStore
from ._video import VideoLinks, video_bytes

_RANGE_SPEC: Final = re.compile(r"([0-9]*)-([0-9]*)")
_PLAIN: Final = "text/plain"


class RangeNotSatisfiable(Exception):
    """A single byte range none of whose bytes are in the file (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, stop)`` a ``Range`` header asks of a ``size``-byte file, or None.

    None means "serve the whole file with 200": no header, a header that is not a valid byte
    range set (ignored, RFC 9110 14.2), or a valid set of several ranges. Raises
    :class:`RangeNotSatisfiable` for a single valid range that selects nothing.
    """
    if header is None:
        return None
    unit, equals, ranges = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    # Empty list elements ("bytes=0-1,") are allowed by the list rule (RFC 9110 5.6.1).
    specs = [spec for spec in (part.strip(" \t") for part in ranges.split(",")) if spec]
    matches = [_RANGE_SPEC.fullmatch(spec) for spec in specs]
    parsed: list[tuple[str, str]] = []
    for match in matches:
        if match is None:
            return None
        first, last = match.groups()
        if not first and not last:
            return None
        if first and last and int(last) < int(first):
            return None
        parsed.append((first, last))
    if len(parsed) != 1:
        return None
    first, last = parsed[0]
    if not first:  # suffix range: the last n bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - length), size
    start = int(first)
    if start >= size:
        raise RangeNotSatisfiable
    stop = size if not last else min(int(last) + 1, size)
    return start, stop


@web.middleware
async def _plain_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A CDN answers unknown paths in plain text, not in Kling's JSON envelope."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 Method Not Allowed\n", content_type=_PLAIN)
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 Not Found\n", content_type=_PLAIN)


def etag(data: bytes) -> str:
    """The strong ETag of a file: its content never changes, so a digest names it."""
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


class FileServer:
    """Request handlers of the file origin, over the emulator's state."""

    def __init__(
        self,
        *,
        seed: int,
        clock: EmulatedClock,
        store: TaskStore,
        stats: EmulatorStats,
        faults: FaultInjector,
        links: VideoLinks,
        settings: Settings,
        closing: asyncio.Event,
    ) -> None:
        self._seed = seed
        self._clock = clock
        self._store = store
        self._stats = stats
        self._faults = faults
        self._links = links
        self._settings = settings
        self._closing = closing

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_plain_not_found])
        app.router.add_get("/files/{video_id}.mp4", self._download)  # HEAD too
        return app

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A result file. No auth, like a CDN's hotlink-protected URL: the signature is the key."""
        head = request.method == "HEAD"
        self._stats.requests_per_route["download_head" if head else "download"] += 1
        fault = None if head else self._faults.draw("download")
        if fault in BEFORE_COMMIT:
            assert fault is not None
            return before_commit(fault, self._faults, self._stats)
        video_id = request.match_info["video_id"]
        owner = self._store.video_owner(video_id)
        if owner is None or owner.status_at(self._clock.now()) != "succeed":
            return web.Response(status=404, text="404 Not Found: no such file\n")
        if not self._links.allows(video_id, request.query):
            return web.Response(
                status=403, text="403 Forbidden: the URL expired or its signature is invalid\n"
            )
        data = video_bytes(self._seed, video_id)
        tag = etag(data)
        headers = {"Content-Type": "video/mp4", "Accept-Ranges": "bytes", "ETag": tag}
        status, body = 200, data
        if_range = request.headers.get("If-Range")
        if if_range is None or if_range.strip() == tag:
            try:
                part = parse_range(request.headers.get("Range"), len(data))
            except RangeNotSatisfiable:
                headers["Content-Range"] = f"bytes */{len(data)}"
                headers["Content-Type"] = _PLAIN
                return web.Response(status=416, headers=headers, text="416 Range Not Satisfiable\n")
            if part is not None:
                start, stop = part
                status, body = 206, data[start:stop]
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        if head:  # aiohttp sends the headers (Content-Length included) and no body
            return web.Response(status=status, headers=headers, body=body)
        if fault is not None:
            self._stats.faults_injected[fault.value] += 1
        if fault is FaultKind.DROP_AFTER_COMMIT:
            return drop(request)
        if fault is FaultKind.STALL_AFTER_COMMIT:
            await stall(self._faults.stall_seconds, self._closing)
        if fault is FaultKind.DROP_MID_DOWNLOAD:
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            return drop(request, response)
        if self._settings.download_rate is not None:
            return await self._trickle(request, status, headers, body, self._settings.download_rate)
        return web.Response(status=status, headers=headers, body=body)

    async def _trickle(
        self, request: web.Request, status: int, headers: dict[str, str], body: bytes, rate: float
    ) -> web.StreamResponse:
        """Serve ``body`` at ``rate`` bytes per real second, in twentieths of a second."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        step = max(1, int(rate / 20))
        try:
            for start in range(0, len(body), step):
                await response.write(body[start : start + step])
                with anyio.move_on_after(step / rate):
                    await self._closing.wait()
                if self._closing.is_set():
                    return drop(request, response)
        except ConnectionError:
            return response  # the client went away mid-file: nothing more to do
        await response.write_eof()
        return response
