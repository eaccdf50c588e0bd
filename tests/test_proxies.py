"""Proxies from the environment: a real forward proxy on loopback counts what goes through it.

With ``HTTP_PROXY`` set, the client's API requests and its file downloads go through the proxy;
with ``NO_PROXY`` covering the host, or ``trust_env=False``, they do not. A netrc file (which
aiohttp's own ``trust_env`` would read) never puts a login on any request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import kling_async as ka
from kling_async.http.transport import HttpTransport, Timeouts
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "host"}


class ForwardProxy:
    """Serves absolute-form ``http://`` requests by making them itself; records each one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = str(request.url)
        self.seen.append((request.method, target, dict(request.headers)))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            ) as answer,
        ):
            payload = await answer.read()
            kept = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in _HOP_BY_HOP | {"content-length", "transfer-encoding"}
            }
            return web.Response(status=answer.status, body=payload, headers=kept)


@asynccontextmanager
async def forward_proxy() -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    proxy.url = f"http://{host}:{port}"
    try:
        yield proxy
    finally:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    # A netrc file with a login for every host: it must never be sent anywhere.
    netrc = tmp_path / "netrc"
    netrc.write_text("default login netrc-user password netrc-password-canary\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))


async def a_round_trip(kling: ka.KlingClient, tmp_path: Path) -> None:
    task = await kling.text2video.create(ka.Text2VideoRequest(prompt="through the proxy"))
    task = await kling.text2video.wait(task.task_id, timeout=30)
    await kling.download(task, tmp_path / "clip.mp4")


async def test_http_proxy_carries_api_and_file_requests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with forward_proxy() as proxy, Emulator(time_scale=SCALE) as emu:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with client_for(emu) as kling:
            await a_round_trip(kling, tmp_path)
            api, files = kling._transport.api_requests, kling._transport.file_requests
    targets = [target for _method, target, _headers in proxy.seen]
    assert api >= 2 and files >= 1
    assert len(targets) == api + files  # every request went through the proxy
    assert all(target.startswith("http://127.0.0.1:") for target in targets)
    assert sum(1 for method, _t, _h in proxy.seen if method == "POST") == 1
    assert (tmp_path / "clip.mp4").stat().st_size > 0
    for _method, target, headers in proxy.seen:
        authorization = headers.get("Authorization", "")
        assert not authorization.startswith("Basic"), target  # no netrc login, anywhere
        assert "netrc" not in " ".join(headers.values())
        if "/v1/" not in target:
            assert "Authorization" not in headers  # a file host gets the URL and nothing else


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "*", "localhost,127.0.0.1"])
async def test_no_proxy_covering_the_host_goes_direct(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_proxy: str
) -> None:
    async with forward_proxy() as proxy, Emulator(time_scale=SCALE) as emu:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        async with client_for(emu) as kling:
            await a_round_trip(kling, tmp_path)
    assert proxy.seen == []
    assert emu.stats.requests_per_route["create"] == 1


async def test_trust_env_off_ignores_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with forward_proxy() as proxy, Emulator(time_scale=SCALE) as emu:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        for trust_env, through in ((False, 0), (True, 1)):
            transport = HttpTransport(emu.url, timeouts=Timeouts(), trust_env=trust_env)
            await transport.open()
            try:
                answer = await transport.send(
                    "GET", "/v1/videos/text2video/1", authorization=f"Bearer {emu.api_key}"
                )
            finally:
                await transport.aclose()
            assert answer.status in (400, 404)  # the emulator answered (no such task)
            assert transport.api_requests == 1
            assert len(proxy.seen) == through


async def test_a_netrc_file_does_not_break_api_requests_without_a_proxy(tmp_path: Path) -> None:
    """aiohttp's trust_env would pair the netrc login with our Authorization header and refuse
    every request; the client never reads netrc at all."""
    async with Emulator(time_scale=SCALE) as emu, client_for(emu) as kling:
        await a_round_trip(kling, tmp_path)
        assert kling._transport.file_requests >= 1
    assert emu.stats.tasks_created == 1
