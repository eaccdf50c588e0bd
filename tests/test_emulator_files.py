"""Result files: real MP4s, served from a separate origin (http or https) with Range and HEAD,
on the host name the client used, and a hook that hands out hostile URLs instead."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults
from kling_async.testing._video import CLIP_NAMES, clip
from tests.conftest import client_for
from tests.test_emulator import Api, call
from tests.test_emulator_callbacks import receiver, settle

pytestmark = pytest.mark.anyio

SCALE = 0.001
DATA = Path(__file__).resolve().parent.parent / "kling_async" / "testing" / "_data"
FFPROBE = shutil.which("ffprobe")
needs_ffprobe = pytest.mark.skipif(
    FFPROBE is None and not os.environ.get("CI"),  # in CI it is required (.ci/run installs it)
    reason="ffprobe (ffmpeg) is not installed: the MP4s' box structure is still checked by "
    "test_shipped_clips_are_iso_bmff_files and test_a_served_file_is_a_clip_plus_an_id_box",
)


# -- ISO BMFF, checked by hand -------------------------------------------------------------------


def boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """The top-level boxes of an ISO BMFF file as (type, payload); asserts they tile the file."""
    found = []
    offset = 0
    while offset < len(data):
        assert offset + 8 <= len(data), "a truncated box header"
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:
            size = len(data) - offset
        assert header <= size <= len(data) - offset, (kind, size)
        found.append((kind, data[offset + header : offset + size]))
        offset += size
    return found


def assert_h264_mp4(data: bytes) -> list[tuple[bytes, bytes]]:
    top = boxes(data)
    kinds = [kind for kind, _ in top]
    assert kinds[0] == b"ftyp"
    major, _minor = struct.unpack_from(">4sI", top[0][1])
    assert major in (b"isom", b"mp42", b"mp41")
    assert b"moov" in kinds
    assert b"mdat" in kinds
    moov = dict(boxes(top[kinds.index(b"moov")][1]))
    assert b"mvhd" in moov
    assert b"trak" in moov
    assert b"avc1" in top[kinds.index(b"moov")][1]  # the H.264 sample entry
    assert len(top[kinds.index(b"mdat")][1]) > 100
    return top


def test_shipped_clips_are_iso_bmff_files() -> None:
    assert 3 <= len(CLIP_NAMES) <= 4
    for index, name in enumerate(CLIP_NAMES):
        data = (DATA / name).read_bytes()
        assert data == clip(index)
        assert len(data) < 16 * 1024
        assert_h264_mp4(data)
    assert (DATA / "README.md").read_text().count("ffmpeg ") >= 1


async def ffprobe(path: Path) -> dict[str, Any]:
    assert FFPROBE is not None
    result = await anyio.run_process(
        [FFPROBE, "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)]
    )
    probed: dict[str, Any] = json.loads(result.stdout)
    return probed


@needs_ffprobe
async def test_ffprobe_accepts_the_shipped_clips() -> None:
    for name in CLIP_NAMES:
        probed = await ffprobe(DATA / name)
        (stream,) = probed["streams"]
        assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 128, 72)
        assert float(probed["format"]["duration"]) == pytest.approx(1.0, abs=0.2)


async def finished_video(emu: Emulator, session: aiohttp.ClientSession, **body: Any) -> Any:
    """Create a task (median_duration=0: done at once) and GET it: its first video object."""
    api = Api(session, emu)
    task_id = await api.task_id(**body)
    _, answer = await api.get(f"/{task_id}")
    return answer["data"]["task_result"]["videos"][0]


async def test_a_served_file_is_a_clip_plus_an_id_box(tmp_path: Path) -> None:
    async with (
        Emulator(time_scale=SCALE, median_duration=0, seed=4) as emu,
        aiohttp.ClientSession() as session,
    ):
        video = await finished_video(emu, session)
        async with session.get(video["url"]) as response:
            assert response.status == 200
            assert response.content_type == "video/mp4"
            data = await response.read()
        assert data == emu.video_bytes(video["id"])
        top = assert_h264_mp4(data)
        kind, payload = top[-1]
        assert kind == b"free"
        assert payload.endswith(video["id"].encode())
        assert data[: -len(payload) - 8] in {clip(index) for index in range(len(CLIP_NAMES))}
        if FFPROBE is not None:  # the structural check above never skips
            (tmp_path / "served.mp4").write_bytes(data)
            (stream,) = (await ffprobe(tmp_path / "served.mp4"))["streams"]
            assert stream["codec_name"] == "h264"


async def test_every_video_has_its_own_bytes() -> None:
    async with (
        Emulator(time_scale=SCALE, median_duration=0) as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        ids = [emu.tasks[await api.task_id()].video_ids[0] for _ in range(16)]
        digests = {emu.video_sha256(video_id) for video_id in ids}
        assert len(digests) == 16
        bases = set()
        for video_id in ids:
            data = emu.video_bytes(video_id)
            bases.add(data[: len(data) - 8 - len(boxes(data)[-1][1])])
        assert bases <= {clip(index) for index in range(len(CLIP_NAMES))}
        assert len(bases) >= 2  # the clips are spread over videos
        for video_id in ids[:3]:
            digest = hashlib.sha256(emu.video_bytes(video_id)).hexdigest()
            assert digest == emu.video_sha256(video_id)


# -- the file origin ---------------------------------------------------------------------------


async def test_files_come_from_their_own_origin() -> None:
    async with (
        Emulator(time_scale=SCALE, median_duration=0) as emu,
        aiohttp.ClientSession() as session,
    ):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", emu.files_url)
        assert emu.files_url != emu.url
        video = await finished_video(emu, session)
        assert video["url"] == f"{emu.files_url}/files/{video['id']}.mp4"
        path = f"/files/{video['id']}.mp4"
        status, answer = await call(session, "GET", emu.url + path)
        assert status == 404  # the API port serves no files...
        assert answer["code"] == 1203
        status, text = await call(session, "GET", emu.files_url + "/v1/videos/text2video")
        assert status == 404  # ...and the file origin no API, in plain text like a CDN
        assert isinstance(text, str)
        status, _ = await call(session, "POST", emu.files_url + path)
        assert status == 405


async def test_urls_use_the_host_name_the_client_used() -> None:
    async with (
        receiver() as hook,
        Emulator(time_scale=SCALE, median_duration=20, callbacks="terminal") as emu,
        aiohttp.ClientSession() as session,
    ):
        port = emu.files_url.rsplit(":", 1)[1]
        local = Api(session, emu)
        local.base = emu.url.replace("127.0.0.1", "localhost") + "/v1"
        task_id = await local.task_id(callback_url=hook.url)
        await settle(emu, hook, 0.0)
        by_name = {}
        for api, name in ((local, "localhost"), (Api(session, emu), "127.0.0.1")):
            _, answer = await api.get(f"/{task_id}")
            by_name[name] = answer["data"]["task_result"]["videos"][0]["url"]
            _, answer = await api.get()
            assert answer["data"][0]["task_result"]["videos"][0]["url"] == by_name[name]
        video_id = emu.tasks[task_id].video_ids[0]
        assert by_name == {name: f"http://{name}:{port}/files/{video_id}.mp4" for name in by_name}
        for url in by_name.values():
            async with session.get(url) as response:
                assert await response.read() == emu.video_bytes(video_id)
        # No request, no Host header: a callback's URLs name the bind address.
        (body,) = hook.bodies
        assert body["task_result"]["videos"][0]["url"] == by_name["127.0.0.1"]


async def test_ipv6_urls_are_bracketed() -> None:
    async with (
        Emulator(host="::1", time_scale=SCALE, median_duration=0) as emu,
        aiohttp.ClientSession() as session,
    ):
        assert emu.url.startswith("http://[::1]:")
        assert emu.files_url.startswith("http://[::1]:")
        video = await finished_video(emu, session)
        assert video["url"].startswith(emu.files_url + "/files/")
        async with session.get(video["url"]) as response:
            assert await response.read() == emu.video_bytes(video["id"])


async def test_unknown_unfinished_and_unsigned_files() -> None:
    async with (
        Emulator(time_scale=SCALE, median_duration=1e6, url_ttl=100) as emu,
        aiohttp.ClientSession() as session,
    ):
        task_id = await Api(session, emu).task_id()
        unfinished = emu.tasks[task_id].video_ids[0]
        for video_id in (unfinished, "no-such-video"):
            async with session.get(f"{emu.files_url}/files/{video_id}.mp4") as response:
                assert response.status == 404
        emu.set_lifecycle(median_duration=0)
        video = await finished_video(emu, session)
        async with session.get(video["url"].split("?")[0]) as response:
            assert response.status == 403
        async with session.get(video["url"]) as response:
            assert response.status == 200


# -- Range and HEAD ------------------------------------------------------------------------------


@attrs.frozen
class Case:
    """A Range header and, where the header is well formed, what it must get."""

    header: str
    status: int | None = None  # None: only the invariants are checked
    part: tuple[int, int] | None = None  # expected [start, stop) of a 206


SIZE_SLACK = 200


def _spec(size: int) -> st.SearchStrategy[tuple[str, int, tuple[int, int] | None]]:
    """One range-spec with its meaning for a file of ``size`` bytes (416 as status)."""
    position = st.integers(min_value=0, max_value=size + SIZE_SLACK)

    def closed(pair: tuple[int, int]) -> tuple[str, int, tuple[int, int] | None]:
        first, last = sorted(pair)
        if first >= size:
            return f"{first}-{last}", 416, None
        return f"{first}-{last}", 206, (first, min(last, size - 1) + 1)

    def opened(first: int) -> tuple[str, int, tuple[int, int] | None]:
        return (f"{first}-", 416, None) if first >= size else (f"{first}-", 206, (first, size))

    def suffix(length: int) -> tuple[str, int, tuple[int, int] | None]:
        if length == 0:
            return "-0", 416, None
        return f"-{length}", 206, (max(0, size - length), size)

    return st.one_of(
        st.tuples(position, position).map(closed),
        position.map(opened),
        position.map(suffix),
    )


def cases(size: int) -> st.SearchStrategy[Case]:
    unit = st.sampled_from(["bytes", "Bytes", "BYTES"])
    single = st.tuples(unit, _spec(size)).map(
        lambda pair: Case(f"{pair[0]}={pair[1][0]}", pair[1][1], pair[1][2])
    )
    several = st.lists(_spec(size), min_size=2, max_size=4).map(
        lambda specs: Case("bytes=" + ", ".join(spec for spec, _, _ in specs), 200)
    )
    reversed_range = st.tuples(
        st.integers(min_value=1, max_value=size), st.integers(min_value=1, max_value=50)
    ).map(lambda pair: Case(f"bytes={pair[0]}-{pair[0] - pair[1]}", 200))
    other_unit = _spec(size).map(lambda spec: Case(f"items={spec[0]}", 200))
    garbage = st.text(alphabet="bytes=-0123456789, ;\t", max_size=24).map(Case)
    return st.one_of(single, several, reversed_range, other_unit, garbage)


@pytest.fixture
async def served() -> AsyncIterator[tuple[aiohttp.ClientSession, str, bytes]]:
    async with (
        Emulator(time_scale=SCALE, median_duration=0, seed=2) as emu,
        aiohttp.ClientSession() as session,
    ):
        video = await finished_video(emu, session)
        yield session, video["url"], emu.video_bytes(video["id"])


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class PortalServer:
    """An emulator and a client session on an event loop in another thread.

    Hypothesis drives a synchronous test, so the many examples of one property share one
    emulator (started once, read-only) and each request runs on that loop through the portal.
    """

    def __init__(self, portal: BlockingPortal) -> None:
        self._portal = portal
        self._emu = Emulator(time_scale=SCALE, median_duration=0, seed=2)
        self.url = ""
        self.data = b""

    async def _start(self) -> None:
        await self._emu.start()
        self._session = aiohttp.ClientSession()
        video = await finished_video(self._emu, self._session)
        self.url, self.data = video["url"], self._emu.video_bytes(video["id"])

    async def _stop(self) -> None:
        await self._session.close()
        await self._emu.aclose()

    async def _get(self, headers: dict[str, str]) -> Answer:
        async with self._session.get(self.url, headers=headers) as response:
            return Answer(response.status, dict(response.headers), await response.read())

    def get(self, headers: dict[str, str]) -> Answer:
        return self._portal.call(self._get, headers)


@pytest.fixture(scope="module")
def portal_server() -> Iterator[PortalServer]:
    with start_blocking_portal("asyncio") as portal:
        server = PortalServer(portal)
        portal.call(server._start)
        try:
            yield server
        finally:
            portal.call(server._stop)


def check_answer(case: Case, status: int, headers: Any, body: bytes, data: bytes) -> None:
    size = len(data)
    assert headers["Accept-Ranges"] == "bytes"
    if case.status is not None:
        assert status == case.status, case
    if status == 200:
        assert body == data
        assert "Content-Range" not in headers
    elif status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers["Content-Range"])
        assert match is not None, headers["Content-Range"]
        start, last, total = map(int, match.groups())
        assert total == size
        assert 0 <= start <= last < size
        assert body == data[start : last + 1]
        assert int(headers["Content-Length"]) == len(body)
        assert headers["Content-Type"] == "video/mp4"
        if case.part is not None:
            assert (start, last + 1) == case.part
    else:
        assert status == 416, (case, status)
        assert headers["Content-Range"] == f"bytes */{size}"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_range_requests(portal_server: PortalServer, data: st.DataObject) -> None:
    """Any Range header, over HTTP: what RFC 9110 says for well-formed ones, and for anything
    the invariants (a 206 is exactly the slice its Content-Range names, a 200 the whole file,
    a 416 names the size)."""
    case = data.draw(cases(len(portal_server.data)))
    answer = portal_server.get({"Range": case.header})
    check_answer(case, answer.status, answer.headers, answer.body, portal_server.data)


async def test_range_basics_and_head(served: tuple[aiohttp.ClientSession, str, bytes]) -> None:
    session, url, data = served
    size = len(data)
    for header, status, part in [
        ("bytes=0-99", 206, (0, 100)),
        ("bytes=100-", 206, (100, size)),
        ("bytes=-100", 206, (size - 100, size)),
        (f"bytes=0-{size * 2}", 206, (0, size)),
        (f"bytes={size}-", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=0-1,5-9", 200, None),
        ("bytes=0-1,", 206, (0, 2)),
        ("bytes=9-5", 200, None),
        ("bytes=x-5", 200, None),
        ("bytes=\N{ARABIC-INDIC DIGIT ONE}-5", 200, None),
        ("pages=0-5", 200, None),
    ]:
        async with session.get(url, headers={"Range": header}) as response:
            body = await response.read()
            check_answer(Case(header, status, part), response.status, response.headers, body, data)

    async with session.head(url) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.content_type == "video/mp4"
        assert await response.read() == b""
        tag = response.headers["ETag"]
    async with session.head(url, headers={"Range": "bytes=10-19"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{size}"
        assert response.headers["Content-Length"] == "10"
    async with session.get(url, headers={"Range": "bytes=10-19", "If-Range": tag}) as response:
        assert response.status == 206
    stale = {"Range": "bytes=10-19", "If-Range": '"another-file"'}
    async with session.get(url, headers=stale) as response:
        assert response.status == 200  # a resume against another file gets the whole file
        assert await response.read() == data


async def test_head_is_counted_apart_and_draws_no_fault() -> None:
    faults = Faults(download={FaultKind.DROP_AFTER_COMMIT: 1.0})
    async with (
        Emulator(time_scale=SCALE, median_duration=0, faults=faults) as emu,
        aiohttp.ClientSession() as session,
    ):
        emu.set_faults(None)
        video = await finished_video(emu, session)
        emu.set_faults(faults)
        async with session.head(video["url"]) as response:
            assert response.status == 200
        assert emu.stats.requests_per_route["download_head"] == 1
        assert emu.stats.requests_per_route["download"] == 0
        assert emu.stats.faults_injected["DROP_AFTER_COMMIT"] == 0


async def test_faults_and_trickling_apply_to_a_range() -> None:
    faults = Faults(download={FaultKind.DROP_MID_DOWNLOAD: 1.0})
    async with (
        Emulator(time_scale=SCALE, median_duration=0, faults=faults) as emu,
        aiohttp.ClientSession() as session,
    ):
        emu.set_faults(None)
        video = await finished_video(emu, session)
        data = emu.video_bytes(video["id"])
        emu.set_faults(faults)
        async with session.get(video["url"], headers={"Range": "bytes=1000-"}) as response:
            assert response.status == 206
            assert response.content_length == len(data) - 1000
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert emu.stats.faults_injected["DROP_MID_DOWNLOAD"] == 1

        emu.set_faults(None)
        emu.set_download_rate(20_000)  # 1000 bytes in about 50 ms
        async with session.get(video["url"], headers={"Range": "bytes=-1000"}) as response:
            assert response.status == 206
            assert await response.read() == data[-1000:]


async def test_the_sdk_downloads_from_the_file_origin(tmp_path: Path) -> None:
    async with Emulator(time_scale=SCALE, median_duration=0) as emu, client_for(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        result = await kling.download(task.task_id, tmp_path / "clip.mp4")
        assert task.task_id in emu.tasks
        assert result.url.startswith(emu.files_url + "/files/")
        assert result.sha256 == emu.video_sha256(emu.tasks[task.task_id].video_ids[0])
        assert_h264_mp4((tmp_path / "clip.mp4").read_bytes())


# -- https -----------------------------------------------------------------------------------------


async def test_https_file_origin_with_the_shipped_certificate() -> None:
    async with Emulator(time_scale=SCALE, median_duration=0, files_tls=True) as emu:
        assert re.fullmatch(r"https://127\.0\.0\.1:\d+", emu.files_url)
        assert emu.url.startswith("http://")  # the API itself stays plain http
        context = emu.ssl_context()
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname
        strict = emu.ssl_context()
        strict.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
        for trust in (context, strict):
            connector = aiohttp.TCPConnector(ssl=trust)
            async with aiohttp.ClientSession(connector=connector) as session:
                for name in ("127.0.0.1", "localhost"):
                    api = Api(session, emu)
                    api.base = emu.url.replace("127.0.0.1", name) + "/v1"
                    video = await finished_video_via(api)
                    assert video["url"].startswith(f"https://{name}:")
                    async with session.get(video["url"]) as response:
                        assert await response.read() == emu.video_bytes(video["id"])

        async with aiohttp.ClientSession() as session:  # the system's CAs do not trust it
            video = await finished_video_via(Api(session, emu))
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(video["url"])


async def finished_video_via(api: Api) -> Any:
    task_id = await api.task_id()
    _, answer = await api.get(f"/{task_id}")
    return answer["data"]["task_result"]["videos"][0]


# -- hostile result URLs ---------------------------------------------------------------------


async def test_result_url_hook_hands_out_the_template(tmp_path: Path) -> None:
    async with (
        receiver() as hook,
        Emulator(time_scale=SCALE, median_duration=20, callbacks="terminal") as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        emu.set_result_url("http://169.254.169.254/latest/meta-data/{video_id}")
        task_id = await api.task_id(callback_url=hook.url)
        await settle(emu, hook, 0.0)
        video_id = emu.tasks[task_id].video_ids[0]
        metadata = f"http://169.254.169.254/latest/meta-data/{video_id}"
        _, answer = await api.get(f"/{task_id}")
        assert answer["data"]["task_result"]["videos"][0]["url"] == metadata
        _, answer = await api.get()
        assert answer["data"][0]["task_result"]["videos"][0]["url"] == metadata
        assert hook.bodies[0]["task_result"]["videos"][0]["url"] == metadata

        async with client_for(emu) as kling:
            with pytest.raises(ka.DownloadError, match=re.escape("169.254.169.254")):
                await kling.download(task_id, tmp_path / "x.mp4")
        assert not (tmp_path / "x.mp4").exists()
        assert emu.stats.requests_per_route["download"] == 0

        emu.set_result_url("{files}/../../etc/{video_id}")
        _, answer = await api.get(f"/{task_id}")
        url = answer["data"]["task_result"]["videos"][0]["url"]
        assert url == f"{emu.files_url}/../../etc/{video_id}"
        emu.set_result_url(None)
        _, answer = await api.get(f"/{task_id}")
        assert answer["data"]["task_result"]["videos"][0]["url"].startswith(emu.files_url)
        for bad in ("{other}", "{0}", "{video_id", ""):
            with pytest.raises((ValueError, TypeError), match="result_url"):
                emu.set_result_url(bad)
