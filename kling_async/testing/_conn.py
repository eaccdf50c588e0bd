"""Connection-level misbehaviour shared by the API and the file origin: drops and stalls."""

from __future__ import annotations

import asyncio

import anyio
from aiohttp import web


def drop(request: web.Request, response: web.StreamResponse | None = None) -> web.StreamResponse:
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


async def stall(seconds: float, closing: asyncio.Event) -> None:
    """Wait ``seconds`` real seconds, or until the emulator closes (a stall never outlives it)."""
    with anyio.move_on_after(seconds):
        await closing.wait()
