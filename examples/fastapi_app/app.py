"""Prompts in, clips out: a web page over kling-async's FastAPI integration.

    python examples/fastapi_app/app.py          # then open http://127.0.0.1:8000

With ``KLING_API_KEY`` (or ``KLING_ACCESS_KEY`` and ``KLING_SECRET_KEY``) set, it talks to Kling
(``KLING_BASE_URL`` picks another host). With none, it starts the SDK's built-in emulator in its
own lifespan, so everything runs offline. With ``KLING_REDIS_URL`` its workers share one account
(``uvicorn ... --workers 3``). See README.md beside this file.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse

import kling_async as ka
import kling_async.fastapi as kf
from kling_async.testing import Emulator

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8000"))
# Where Kling's callbacks reach this app. Kling needs an address on the internet (your domain,
# a tunnel); without one the client polls. The emulator runs here, so it reaches the app here.
PUBLIC_URL = os.environ.get("PUBLIC_URL")
# Keep the finished clips in this folder; unset, the page plays them from their result URLs.
CLIPS_DIR = os.environ.get("CLIPS_DIR")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
# The emulator's clock runs 20 times fast: a clip of about two emulated minutes takes ~6 s.
TIME_SCALE = 0.05
EMULATED = not (os.environ.get("KLING_API_KEY") or os.environ.get("KLING_ACCESS_KEY"))
# Several workers (processes, machines) share one account's slots, jobs and events through Redis.
REDIS_URL = os.environ.get("KLING_REDIS_URL")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    async with AsyncExitStack() as stack:
        options: dict[str, Any] = {"public_url": PUBLIC_URL, "download_dir": CLIPS_DIR}
        if REDIS_URL:
            from kling_async.redis import RedisAccount  # the [redis] extra

            options["account"] = RedisAccount(REDIS_URL)
            if scale := os.environ.get("KLING_TIME_SCALE"):  # an emulator run apart, scaled
                options["poll"] = ka.PollPolicy().scaled(float(scale))
        if EMULATED and REDIS_URL:
            raise SystemExit("with KLING_REDIS_URL, run one emulator apart: see README.md")
        if EMULATED:
            emu = await stack.enter_async_context(
                Emulator(time_scale=TIME_SCALE, median_duration=120)
            )
            options.update(
                public_url=PUBLIC_URL or f"http://{HOST}:{PORT}",
                api_key=emu.api_key,
                base_url=emu.url,
                poll=ka.PollPolicy().scaled(TIME_SCALE),
            )
        # One client for the app's lifetime; without an api_key it reads KLING_API_KEY itself.
        yield await stack.enter_async_context(kf.lifespan(**options)(app))


app = FastAPI(title="kling-async example", lifespan=lifespan)
# POST /kling/jobs, GET /kling/jobs/{id}/events (live), /kling/jobs/{id}/video, callbacks.
# Submitting costs money: in a real app pass your auth, kf.router(dependencies=[...]).
app.include_router(kf.router(), prefix="/kling")


@app.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE)


@app.get("/backend")
async def backend(kling: kf.Kling) -> dict[str, object]:
    """What the page shows in its header: whom the app's one client talks to."""
    return {"base_url": kling.base_url, "emulator": EMULATED, "worker": os.getpid()}


if __name__ == "__main__":
    # A short graceful shutdown: open event streams must not hold Ctrl+C for long.
    uvicorn.run(app, host=HOST, port=PORT, timeout_graceful_shutdown=2)
