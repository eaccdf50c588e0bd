"""Result files, downloaded so that a crash never leaves a file that looks complete but is not.

Kling's result URLs are hotlink-protected, expire, and point at a CDN the SDK does not control;
they come from the network, like every redirect after them, so nothing about them is trusted.
A download here:

* connects only where :class:`~._addresses.AddressPolicy` allows: the API's own host, or hosts
  whose addresses are all public, checked on the address connected and on every redirect hop
  (``allowed_hosts`` and ``allow_private`` widen it); only ``http`` and ``https``;
* is bounded: a total deadline for the whole download (retries included) and a stall timeout
  for each wait on the body, so a server that trickles a byte every few seconds cannot hold
  it forever; and a size cap;
* keeps only videos: a body announced as HTML, JSON or other text, or whose first bytes are not
  an MP4 ``ftyp`` box, is refused before anything is written;
* streams into a temporary file next to the target (``.NAME.<random>.part``, created with
  ``O_EXCL`` so a planted link is never followed), hashing as it goes, syncs it, renames it
  over the target with :func:`os.replace` and syncs the directory: the target path holds
  either the old file or the complete new one, never a torn write;
* never sends the API credentials: the file host gets the signed URL and nothing else;
* retries what a retry can fix (connection failures, cut bodies, 5xx, 429, 408) with the
  shell's one retry primitive (the client's policy, Retry-After, the download's deadline),
  and on 403/404/410, the signs of an expired URL, fetches the task again for a
  fresh URL instead of retrying the dead one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, suppress
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import anyio
import attrs

from kling_async._errors import DownloadError, TransportError, ValidationError
from kling_async.http.addresses import AddressPolicy
from kling_async.http.retrying import Retrying
from kling_async.http.transport import ByteStream, HttpTransport, redact_url
from kling_async.protocol.models import Task, Video
from kling_async.protocol.retry import RetryPolicy, parse_retry_after

__all__ = [
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_BYTES",
    "PART_SUFFIX",
    "DownloadResult",
    "check_allowed_hosts",
    "download_video",
    "replace_durably",
]

log = logging.getLogger("kling_async")

#: 2 GiB: far above any Kling clip (tens of MB), far below a disk-filling mistake.
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Temporary files end with this; a crashed download leaves one behind, nothing else.
PART_SUFFIX = ".part"

_EXPIRED = frozenset({403, 404, 410})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
#: Fresh URLs fetched per download before giving up (a URL that is dead as soon as it is
#: issued is a server problem, not an expiry).
_MAX_REFRESHES = 2
#: The whole download, retries included, must finish within this many seconds by default.
DEFAULT_DOWNLOAD_TIMEOUT = 600.0
#: Content types that are certainly not a video, whatever the URL says.
_NOT_VIDEO_TYPES = frozenset(
    {"application/json", "application/xml", "application/javascript", "application/xhtml+xml"}
)
_SNIFF_BYTES = 8


@attrs.frozen
class DownloadResult:
    """Where a file landed, how big it is and its SHA-256 (hex), computed while streaming.

    ``task`` is the snapshot whose URL worked: a fresh one if the first URL had expired.
    """

    path: Path
    size: int
    sha256: str
    task: Task

    @property
    def url(self) -> str:
        video = self.task.video
        return video.url if video is not None else ""


class _Expired(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def check_allowed_hosts(hosts: Iterable[str] | None) -> frozenset[str] | None:
    """Check and normalise ``allowed_hosts``: host names trusted whatever their addresses,
    lower case; ``.example.com`` also covers its subdomains."""
    if hosts is None:
        return None
    if isinstance(hosts, str):
        raise ValidationError("allowed_hosts", hosts, "must be a collection of host names")
    normalised = set()
    for host in hosts:
        if not isinstance(host, str) or not host.strip(".").strip():
            raise ValidationError("allowed_hosts", host, "must be a host name")
        normalised.add(host.strip().lower())
    return frozenset(normalised)


def _check_url(url: str) -> None:
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise DownloadError(f"refusing to download from an unparsable URL {shown}") from None
    if parts.scheme not in ("http", "https"):
        raise DownloadError(
            f"refusing to download from {shown}: only http and https URLs are fetched",
            url=shown,
        )
    if not host:
        raise DownloadError(f"refusing to download from {shown}: no host", url=shown)


def _not_a_video(content_type: str | None) -> str | None:
    """Why a Content-Type rules a body out as a video, or None."""
    if not content_type:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime.startswith("text/") or mime in _NOT_VIDEO_TYPES or mime.endswith(("+json", "+xml")):
        return f"its Content-Type is {mime}"
    return None


def _pick_video(task: Task, video_id: str | None) -> Video:
    if not task.videos:
        raise DownloadError(
            f"task {task.task_id} has no video to download (status {task.status.value}"
            + (f": {task.status_message}" if task.status_message else "")
            + ")"
        )
    for video in task.videos:
        if video.id == video_id:
            return video
    return task.videos[0]


def _sync_file(fd: int) -> None:
    os.fsync(fd)


def replace_durably(temporary: Path, target: Path) -> None:
    """Rename into place, then sync the directory so the rename itself survives a crash."""
    os.replace(temporary, target)
    try:
        directory = os.open(target.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(directory)
    except OSError:  # pragma: no cover - file systems that refuse to sync a directory
        pass
    finally:
        os.close(directory)


async def _head(stream: ByteStream, chunks: AsyncIterator[bytes]) -> bytes:
    """The first bytes of the body, enough to recognise an MP4 (the rest stays in ``chunks``).

    Read before any file is created, so a body that is not a video leaves nothing behind.
    """
    head = b""
    async for chunk in chunks:
        head += chunk
        if len(head) >= _SNIFF_BYTES:
            break
    if head[4:8] != b"ftyp":
        raise DownloadError(
            f"{stream.url} is not a video: its first bytes are not an MP4 ftyp box; nothing saved",
            url=stream.url,
            http_status=stream.status,
        )
    return head


async def _write_body(
    stream: ByteStream, file: BinaryIO, head: bytes, rest: AsyncIterator[bytes], max_bytes: int
) -> tuple[int, str]:
    """Copy ``head`` and the rest of the body into ``file`` and sync it; (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    shown = stream.url

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in rest:
            yield chunk

    async for chunk in body():
        size += len(chunk)
        if size > max_bytes:
            raise DownloadError(
                f"{shown} is larger than the {max_bytes}-byte limit; stopped", url=shown
            )
        digest.update(chunk)
        file.write(chunk)
    expected = stream.content_length
    if expected is not None and size != expected:
        raise _Retryable(f"{shown}: got {size} of {expected} bytes")
    file.flush()
    await anyio.to_thread.run_sync(_sync_file, file.fileno())
    return size, digest.hexdigest()


async def _save(stream: ByteStream, target: Path, max_bytes: int) -> tuple[int, str]:
    """Check the body is a video, stream it into a temporary file beside ``target``, then move
    it into place."""
    async with aclosing(stream.chunks()) as chunks:
        head = await _head(stream, chunks)
        return await _write_file(stream, target, head, chunks, max_bytes)


async def _write_file(
    stream: ByteStream, target: Path, head: bytes, rest: AsyncIterator[bytes], max_bytes: int
) -> tuple[int, str]:
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}{PART_SUFFIX}")
    # os.open honours the umask (mkstemp would make the clip 0600); O_EXCL never follows a
    # link planted at the name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            result = await _write_body(stream, file, head, rest, max_bytes)
        await anyio.to_thread.run_sync(replace_durably, temporary, target)
    except BaseException:
        with suppress(OSError):
            temporary.unlink()
        raise
    return result


async def _fetch(
    transport: HttpTransport,
    url: str,
    target: Path,
    *,
    max_bytes: int,
    policy: AddressPolicy,
    stall_timeout: float | None,
) -> tuple[int, str]:
    """One attempt: follow up to five checked redirects, then save the body."""
    for _hop in range(_MAX_REDIRECTS + 1):
        _check_url(url)
        shown = redact_url(url)
        async with transport.stream(url, policy=policy, stall_timeout=stall_timeout) as stream:
            status = stream.status
            if status in _REDIRECTS:
                location = stream.header("Location")
                if not location:
                    raise DownloadError(f"{shown}: HTTP {status} without a Location", url=shown)
                url = urljoin(url, location)
                continue
            if status in _EXPIRED:
                raise _Expired(status)
            if status == 429 or status == 408 or status >= 500:
                raise _Retryable(
                    f"{shown}: HTTP {status}", parse_retry_after(stream.header("Retry-After"))
                )
            if status != 200:
                raise DownloadError(f"{shown}: HTTP {status}", url=shown, http_status=status)
            refusal = _not_a_video(stream.header("Content-Type"))
            if refusal is not None:
                raise DownloadError(
                    f"{shown} is not a video: {refusal}; nothing saved",
                    url=shown,
                    http_status=status,
                )
            length = stream.content_length
            if length is not None and length > max_bytes:
                raise DownloadError(
                    f"{shown} is {length} bytes, over the {max_bytes}-byte limit",
                    url=shown,
                    http_status=status,
                )
            return await _save(stream, target, max_bytes)
    raise DownloadError(f"{redact_url(url)}: more than {_MAX_REDIRECTS} redirects")


async def download_video(
    transport: HttpTransport,
    refresh: Callable[[str], Awaitable[Task]],
    task: Task,
    path: Path,
    *,
    policy: AddressPolicy,
    retry: RetryPolicy,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float | None = DEFAULT_DOWNLOAD_TIMEOUT,  # noqa: ASYNC109 (a documented budget)
    stall_timeout: float | None = None,
    rng: random.Random | None = None,
) -> DownloadResult:
    """Download ``task``'s first video (see the module docstring for every rule).

    ``refresh`` fetches the task again by id (for a fresh URL). ``timeout`` bounds the whole
    download, retries and refreshes included; ``stall_timeout`` each wait for more of the body
    (None: the transport's read timeout). Raises :class:`DownloadError`, or the
    :class:`KlingError` of a refresh that failed (e.g. ``TaskNotFoundError``).
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValidationError("max_bytes", max_bytes, "must be a whole number of bytes >= 1")
    for name, value in (("timeout", timeout), ("stall_timeout", stall_timeout)):
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e9
        ):
            raise ValidationError(name, value, "must be a number of seconds > 0, or None")
    rng = rng or random.Random()
    video = _pick_video(task, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    result: DownloadResult | None = None
    with anyio.move_on_after(timeout) as scope:
        result = await _download(
            transport,
            refresh,
            task,
            video,
            path,
            policy,
            retry,
            max_bytes,
            stall_timeout,
            rng,
            timeout,
        )
    if result is None or scope.cancelled_caught:
        shown = redact_url(video.url)
        raise DownloadError(
            f"download for task {task.task_id} did not finish within {timeout:g} s "
            f"({shown}); nothing saved",
            url=shown,
        )
    return result


async def _download(
    transport: HttpTransport,
    refresh: Callable[[str], Awaitable[Task]],
    task: Task,
    video: Video,
    path: Path,
    policy: AddressPolicy,
    retry: RetryPolicy,
    max_bytes: int,
    stall_timeout: float | None,
    rng: random.Random,
    timeout: float | None,  # noqa: ASYNC109 (the download's deadline, for the retries)
) -> DownloadResult:
    # The file host is not the API host: the API's health verdict says nothing about it, and
    # the client's retry budget guards the API (a CDN outage must not starve the API's
    # retries). Retries stop at the policy's timeout, and before the download's own deadline.
    deadline = time.monotonic() + retry.timeout
    if timeout is not None:
        deadline = min(deadline, time.monotonic() + timeout)
    retrying = Retrying(retry, deadline=deadline, rng=rng)
    refreshes = 0
    while True:
        failure: TransportError | _Retryable | None = None
        try:
            size, digest = await _fetch(
                transport,
                video.url,
                path,
                max_bytes=max_bytes,
                policy=policy,
                stall_timeout=stall_timeout,
            )
        except _Expired as expired:
            shown = redact_url(video.url)
            if refreshes >= _MAX_REFRESHES:
                raise DownloadError(
                    f"{shown}: HTTP {expired.status} even with a fresh URL from task "
                    f"{task.task_id}; the video may have been deleted (Kling keeps them 30 days)",
                    url=shown,
                    http_status=expired.status,
                ) from None
            refreshes += 1
            log.info(
                "%s answered HTTP %s (expired?); fetching task %s for a fresh URL",
                shown,
                expired.status,
                task.task_id,
            )
            task = await refresh(task.task_id)
            video = _pick_video(task, video.id)
            continue
        except (TransportError, _Retryable) as exc:
            failure = exc
        else:
            return DownloadResult(path=path, size=size, sha256=digest, task=task)
        attempt = retrying.failures + 1
        log.info("download attempt %d failed (%s)", attempt, failure)
        if not await retrying.wait(failure):
            raise DownloadError(
                f"download for task {task.task_id} failed after {attempt} attempts: {failure}",
                url=redact_url(video.url),
            ) from failure
