"""Result URLs are untrusted: where a download may connect, how long it may take, what it keeps.

The client talks to the API as ``localhost``, so the hostile file server on ``127.0.0.1`` is
someone else's loopback service, reached only through the URLs a hostile answer hands out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import kling_async as ka
from tests.hostile import MP4_BYTES, HostileServer

from .conftest import FAST_RETRY

pytestmark = pytest.mark.anyio


@pytest.fixture
async def hostile() -> AsyncIterator[HostileServer]:
    async with HostileServer(api_mode="task", trickle_interval=0.5) as server:
        yield server


def client(hostile: HostileServer, **overrides: object) -> ka.KlingClient:
    settings: dict[str, object] = {
        "api_key": "sk-test",
        "base_url": f"http://localhost:{hostile.port}",
        "retry": FAST_RETRY,
        "timeout": 2.0,
        "connect_timeout": 2.0,
        "max_requests_per_second": None,
    }
    settings.update(overrides)
    return ka.KlingClient(**settings)  # type: ignore[arg-type]


def task_for(url: str) -> ka.Task:
    return ka.Task(task_id="1", status=ka.TaskStatus.SUCCEEDED, videos=(ka.Video(id="v", url=url),))


def nothing_written(directory: Path) -> bool:
    return not any(directory.iterdir())


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "10.0.0.1",
        "127.0.0.1:{port}",
        "2130706433:{port}",
        "0x7f000001:{port}",
        "127.1:{port}",
        "[::ffff:127.0.0.1]:{port}",
        "[::ffff:7f00:1]:{port}",
        "[::1]:{port}",
        "0.0.0.0:{port}",
    ],
)
async def test_hostile_addresses_are_refused_without_a_connection(
    hostile: HostileServer, tmp_path: Path, host: str
) -> None:
    url = f"http://{host.format(port=hostile.port)}/secret"
    async with client(hostile) as kling:
        with pytest.raises(ka.DownloadError) as info:
            await kling.download(task_for(url), tmp_path / "clip.mp4")
    message = str(info.value)
    assert "refusing" in message and "public addresses" in message
    assert host.format(port=hostile.port).rsplit(":", 1)[0].strip("[]") in message
    assert hostile.hits["secret"] == 0
    assert nothing_written(tmp_path)


async def test_a_name_that_resolves_to_loopback_is_refused(tmp_path: Path) -> None:
    async with HostileServer() as hostile:
        # The API is 127.0.0.1 here, so the name localhost is a different, untrusted host.
        async with client(hostile, base_url=hostile.url) as kling:
            with pytest.raises(ka.DownloadError) as info:
                await kling.download(
                    task_for(f"http://localhost:{hostile.port}/secret"), tmp_path / "c.mp4"
                )
    assert "'localhost' resolves to" in str(info.value)
    assert hostile.hits["secret"] == 0


async def test_every_redirect_hop_is_checked(hostile: HostileServer, tmp_path: Path) -> None:
    target = f"http://127.0.0.1:{hostile.port}/secret"
    url = f"http://localhost:{hostile.port}/redirect?to={target}"
    async with client(hostile) as kling:
        with pytest.raises(ka.DownloadError) as info:
            await kling.download(task_for(url), tmp_path / "clip.mp4")
    assert "127.0.0.1" in str(info.value)
    assert hostile.hits["redirect"] == 1
    assert hostile.hits["secret"] == 0
    assert nothing_written(tmp_path)


async def test_the_api_host_on_any_port_needs_no_setting(
    hostile: HostileServer, tmp_path: Path
) -> None:
    async with client(hostile) as kling:
        result = await kling.download(
            task_for(f"http://localhost:{hostile.port}/mp4"), tmp_path / "clip.mp4"
        )
    assert (tmp_path / "clip.mp4").read_bytes() == MP4_BYTES
    assert result.size == len(MP4_BYTES)


@pytest.mark.parametrize(
    "widen", [{"allowed_hosts": ["127.0.0.1"]}, {"allow_private": True}], ids=["hosts", "private"]
)
async def test_allowed_hosts_and_the_private_opt_in_widen_the_rule(
    hostile: HostileServer, tmp_path: Path, widen: dict[str, object]
) -> None:
    async with client(hostile) as kling:
        await kling.download(
            task_for(f"http://127.0.0.1:{hostile.port}/secret"),
            tmp_path / "clip.mp4",
            **widen,  # type: ignore[arg-type]
        )
    assert hostile.hits["secret"] == 1
    assert (tmp_path / "clip.mp4").read_bytes() == MP4_BYTES


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("html", "Content-Type is text/html"),
        ("json", "Content-Type is application/json"),
        ("notmp4", "not an MP4 ftyp box"),
    ],
)
async def test_a_body_that_is_not_a_video_is_refused_and_nothing_saved(
    hostile: HostileServer, tmp_path: Path, path: str, reason: str
) -> None:
    async with client(hostile) as kling:
        with pytest.raises(ka.DownloadError) as info:
            await kling.download(
                task_for(f"http://localhost:{hostile.port}/{path}"), tmp_path / "clip.mp4"
            )
    assert reason in str(info.value)
    assert "not a video" in str(info.value)
    assert hostile.hits[path] == 1  # a verdict, not retried
    assert nothing_written(tmp_path)


async def test_a_trickling_body_fails_within_its_deadline(
    hostile: HostileServer, tmp_path: Path
) -> None:
    async with client(hostile) as kling:
        with anyio.fail_after(20), pytest.raises(ka.DownloadError) as info:
            await kling.download(
                task_for(f"http://localhost:{hostile.port}/trickle"),
                tmp_path / "clip.mp4",
                timeout=1.5,
            )
    assert "did not finish within 1.5 s" in str(info.value)
    assert nothing_written(tmp_path)


async def test_a_stalled_body_times_out_per_read(hostile: HostileServer, tmp_path: Path) -> None:
    retry = ka.RetryPolicy(attempts=2, timeout=5, initial=0.01, maximum=0.02)
    async with client(hostile) as kling:
        with anyio.fail_after(20), pytest.raises(ka.DownloadError) as info:
            await kling.download(
                task_for(f"http://localhost:{hostile.port}/stall"),
                tmp_path / "clip.mp4",
                stall_timeout=0.3,
                retry=retry,
            )
    assert "after 2 attempts" in str(info.value)
    assert hostile.hits["stall"] == 2
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", 0), ("timeout", -1), ("stall_timeout", float("nan")), ("allow_private", "yes")],
)
async def test_bad_download_options_fail_before_any_request(
    hostile: HostileServer, tmp_path: Path, option: str, value: object
) -> None:
    async with client(hostile) as kling:
        with pytest.raises(ka.ValidationError) as info:
            await kling.download(
                task_for(f"http://localhost:{hostile.port}/mp4"),
                tmp_path / "clip.mp4",
                **{option: value},  # type: ignore[arg-type]
            )
    assert info.value.field == option
    assert hostile.hits["mp4"] == 0
