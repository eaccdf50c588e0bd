"""``KlingClient.download``: atomic, verified, retried, refreshed, and careful about where it
goes. Against the in-process emulator, plus a tiny file server to see exactly what is sent."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from aiohttp import web

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

FAST = ka.RetryPolicy(attempts=4, timeout=5.0, initial=0.01, maximum=0.05)


async def finished_task(kling: ka.KlingClient) -> ka.Task:
    task = await kling.text2video.create(ka.Text2VideoRequest(prompt="a fox"))
    return await kling.text2video.wait(task.task_id, timeout=10)


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_download_is_verified_atomic_and_ours(emu: Emulator, tmp_path: Path) -> None:
    async with client_for(emu) as kling:
        task = await finished_task(kling)
        target = tmp_path / "clips" / "001-fox.mp4"
        result = await kling.download(task, target)
        assert task.video is not None
        expected = emu.video_sha256(task.video.id)
        assert result.sha256 == expected == hashlib.sha256(target.read_bytes()).hexdigest()
        assert result.size == target.stat().st_size
        assert result.path == target
        assert files_in(target.parent) == ["001-fox.mp4"]
        umask = os.umask(0)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask
        # By task id too; an existing file is replaced whole.
        target.write_bytes(b"old")
        again = await kling.download(task.task_id, target)
        assert again.sha256 == expected == hashlib.sha256(target.read_bytes()).hexdigest()


async def test_an_expired_url_is_refreshed_from_the_task(tmp_path: Path) -> None:
    async with Emulator(time_scale=SCALE, url_ttl=60) as emu, client_for(emu) as kling:
        task = await finished_task(kling)
        await anyio.sleep(100 * SCALE)  # past the 60 emulated seconds
        gets = emu.stats.requests_per_route["get"]
        result = await kling.download(task, tmp_path / "a.mp4")
        assert emu.stats.requests_per_route["download"] == 2  # 403, then the fresh URL
        assert emu.stats.requests_per_route["get"] == gets + 1
        assert result.url != (task.video.url if task.video else None)
        assert task.video is not None
        assert result.sha256 == emu.video_sha256(task.video.id)


async def test_cut_downloads_are_retried_and_never_leave_a_partial_file(tmp_path: Path) -> None:
    faults = Faults(download={FaultKind.DROP_MID_DOWNLOAD: 0.5})
    async with Emulator(time_scale=SCALE, faults=faults, seed=5) as emu, client_for(emu) as kling:
        task = await finished_task(kling)
        assert task.video is not None
        for index in range(6):
            result = await kling.download(task, tmp_path / f"{index}.mp4", retry=FAST)
            assert result.sha256 == emu.video_sha256(task.video.id)
        assert emu.stats.faults_injected[FaultKind.DROP_MID_DOWNLOAD.name] > 0
        emu.set_faults(Faults(download={FaultKind.DROP_MID_DOWNLOAD: 1.0}))
        with pytest.raises(ka.DownloadError, match="failed after 4 attempts"):
            await kling.download(task, tmp_path / "never.mp4", retry=FAST)
    assert files_in(tmp_path) == [f"{index}.mp4" for index in range(6)]


async def test_size_cap_allowlist_and_scheme_are_enforced(emu: Emulator, tmp_path: Path) -> None:
    async with client_for(emu) as kling:
        task = await finished_task(kling)
        with pytest.raises(ka.DownloadError, match="over the 100-byte limit"):
            await kling.download(task, tmp_path / "big.mp4", max_bytes=100)
        downloads = emu.stats.requests_per_route["download"]
        emu.set_result_url("http://10.0.0.1/files/{video_id}.mp4")
        hostile = await kling.text2video.get(task.task_id)
        emu.set_result_url(None)
        with pytest.raises(ka.DownloadError, match=r"10\.0\.0\.1.*private"):
            await kling.download(hostile, tmp_path / "x.mp4")
        assert emu.stats.requests_per_route["download"] == downloads  # refused before sending
        await kling.download(task, tmp_path / "ok.mp4", allowed_hosts=["cdn.example.com"])
        local = ka.Task(
            task_id=task.task_id,
            status=ka.TaskStatus.SUCCEEDED,
            videos=(ka.Video(id="v", url="file:///etc/passwd"),),
        )
        with pytest.raises(ka.DownloadError, match="only http and https"):
            await kling.download(local, tmp_path / "passwd.mp4")
        failed = ka.Task(task_id="t", status=ka.TaskStatus.FAILED, status_message="nope")
        with pytest.raises(ka.DownloadError, match="has no video"):
            await kling.download(failed, tmp_path / "none.mp4")
        with pytest.raises(ka.ValidationError):
            await kling.download(task, tmp_path / "y.mp4", allowed_hosts="127.0.0.1")
    assert files_in(tmp_path) == ["ok.mp4"]


async def test_cancelling_a_download_leaves_nothing_behind(tmp_path: Path) -> None:
    async with Emulator(time_scale=SCALE, download_rate=2000) as emu, client_for(emu) as kling:
        task = await finished_task(kling)
        with anyio.move_on_after(0.3):
            await kling.download(task, tmp_path / "slow.mp4")
        assert emu.stats.requests_per_route["download"] == 1
    assert files_in(tmp_path) == []


@pytest.fixture
async def file_host() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A file server that records each request's headers; /redirect/... answers 302."""
    seen: list[dict[str, str]] = []
    body = b"\x00\x00\x00\x20ftypisom" + bytes(range(256)) * 8

    async def serve(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers) | {"path": request.raw_path})
        name = request.match_info["name"]
        if name == "hop":
            raise web.HTTPFound("/files/clip.mp4?sig=a/b")
        if name == "away":
            raise web.HTTPFound("http://elsewhere.invalid/clip.mp4")
        if name == "ftp":
            raise web.HTTPFound("ftp://127.0.0.1/clip.mp4")
        return web.Response(body=body, content_type="video/mp4")

    app = web.Application()
    app.router.add_get("/files/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", seen
    finally:
        await runner.cleanup()


def task_at(url: str) -> ka.Task:
    return ka.Task(
        task_id="t1", status=ka.TaskStatus.SUCCEEDED, videos=(ka.Video(id="v1", url=url),)
    )


async def test_the_file_host_never_sees_credentials_and_redirects_are_checked(
    emu: Emulator, tmp_path: Path, file_host: tuple[str, list[dict[str, str]]]
) -> None:
    base, seen = file_host
    async with client_for(emu) as kling:
        signed = f"{base}/files/clip.mp4?sig=a%2Fb%3D&x=1+2"
        result = await kling.download(task_at(signed), tmp_path / "a.mp4")
        assert result.size == 12 + 256 * 8
        await kling.download(task_at(f"{base}/files/hop"), tmp_path / "a.mp4")
        assert [request["path"] for request in seen] == [
            "/files/clip.mp4?sig=a%2Fb%3D&x=1+2",  # sent as given: a signature survives
            "/files/hop",
            "/files/clip.mp4?sig=a/b",  # where the redirect pointed
        ]
        assert all("Authorization" not in request for request in seen)
        assert all(emu.api_key not in str(request) for request in seen)
        with pytest.raises(ka.DownloadError, match=r"elsewhere\.invalid"):
            await kling.download(task_at(f"{base}/files/away"), tmp_path / "b.mp4")
        with pytest.raises(ka.DownloadError, match="only http and https"):
            await kling.download(task_at(f"{base}/files/ftp"), tmp_path / "c.mp4")
    assert files_in(tmp_path) == ["a.mp4"]
