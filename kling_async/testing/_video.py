"""Result files: real, playable MP4 bytes per video, and the links that point at them.

Clients download, checksum and (some) probe or play results, so a file must be a valid video and
knowable in advance. The package ships a few tiny H.264 MP4 clips (``_data/``, with the command
that made them); a video's file is one of them, picked from the seed and the video id, with one
``free`` box appended that carries the video id. Every player and parser skips ``free`` boxes, so
the file stays playable, and each video gets its own bytes and SHA-256.

Real result URLs point at a CDN, not the API host, are hotlink-protected and expire. So links
name the emulator's separate file origin (``files_url``), on the host name the client used to
reach the API; ``url_ttl`` adds an HMAC over the video id and a wall-clock expiry, so a client
that keeps a stale URL gets a 403 and must GET the task again. A test may also swap every link
for a hostile one (:attr:`VideoLinks.template`) to check that a client refuses it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.resources
import secrets
import string
import struct
from collections.abc import Mapping
from typing import Final

from ._clock import EmulatedClock

#: The shipped clips, in the order a video id's digest picks from.
CLIP_NAMES: Final = (
    "clip-testsrc.mp4",
    "clip-testsrc2.mp4",
    "clip-smptebars.mp4",
    "clip-rgbtestsrc.mp4",
)
#: The box appended to each clip; ``free`` because every ISO BMFF reader must skip it.
ID_BOX_TYPE: Final = b"free"
_ID_BOX_PREFIX: Final = b"kling-async emulator video_id="


def data_file(name: str) -> bytes:
    """A file shipped in ``kling_async/testing/_data``."""
    return importlib.resources.files("kling_async.testing").joinpath("_data", name).read_bytes()


@functools.cache
def clip(index: int) -> bytes:
    """One of the shipped MP4 clips (read once, then cached)."""
    return data_file(CLIP_NAMES[index])


def video_bytes(seed: int, video_id: str) -> bytes:
    """A playable MP4: a shipped clip (picked from seed and id) plus a ``free`` box with the id."""
    digest = hashlib.sha256(f"kling-emulator-video:{seed}:{video_id}".encode()).digest()
    payload = _ID_BOX_PREFIX + video_id.encode()
    box = struct.pack(">I4s", 8 + len(payload), ID_BOX_TYPE) + payload
    return clip(digest[0] % len(CLIP_NAMES)) + box


def video_sha256(seed: int, video_id: str) -> str:
    return hashlib.sha256(video_bytes(seed, video_id)).hexdigest()


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"url_ttl must be > 0 emulated seconds or None, got {ttl!r}")
    return ttl


def check_result_url(template: str | None) -> str | None:
    """Refuse a result URL template that does not format with ``video_id`` and ``files``."""
    if template is None:
        return None
    if not isinstance(template, str) or not template:
        raise TypeError(f"result_url must be a non-empty string or None, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"result_url is not a valid format string: {exc}") from None
    fields = {name for _, name, _, _ in parsed if name is not None}
    unknown = fields - {"video_id", "files"}
    if unknown:
        raise ValueError(
            f"result_url may use only {{video_id}} and {{files}}, got {sorted(unknown)}"
        )
    try:
        template.format(video_id="v", files="http://127.0.0.1:1")
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"result_url is not a valid format string: {exc}") from None
    return template


def format_host(host: str) -> str:
    """A host as it goes in a URL: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host else host


class VideoLinks:
    """Builds and checks the absolute URLs put in ``task_result.videos[].url``."""

    def __init__(
        self, *, clock: EmulatedClock, ttl: float | None, key: bytes | None = None
    ) -> None:
        self._clock = clock
        self._ttl = _check_ttl(ttl)
        self.key = key if key is not None else secrets.token_bytes(32)
        #: The bind address and the file origin's scheme and port, set when it listens.
        self.bind_host = "127.0.0.1"
        self.scheme = "http"
        self.port = 0
        self._template: str | None = None

    @property
    def ttl(self) -> float | None:
        return self._ttl

    @ttl.setter
    def ttl(self, ttl: float | None) -> None:
        """Change the TTL from now on; URLs handed out before without a signature stop working
        once a TTL is set, as a CDN that starts signing would refuse them."""
        self._ttl = _check_ttl(ttl)

    @property
    def template(self) -> str | None:
        """While set, every URL handed out is ``template.format(video_id=..., files=...)``."""
        return self._template

    @template.setter
    def template(self, template: str | None) -> None:
        self._template = check_result_url(template)

    def origin(self, host: str | None = None) -> str:
        """``scheme://host:port`` of the file origin, on ``host`` (default: the bind address)."""
        return f"{self.scheme}://{format_host(host or self.bind_host)}:{self.port}"

    def _signature(self, video_id: str, expires: str) -> str:
        message = f"{video_id}:{expires}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()[:32]

    def url(self, video_id: str, host: str | None = None) -> str:
        """A fresh URL on ``host``; with a TTL it is valid for ``ttl`` emulated seconds."""
        origin = self.origin(host)
        if self._template is not None:
            return self._template.format(video_id=video_id, files=origin)
        url = f"{origin}/files/{video_id}.mp4"
        if self._ttl is None:
            return url
        expires = str(self._clock.unix_ms(self._clock.now() + self._ttl))
        return f"{url}?expires={expires}&sig={self._signature(video_id, expires)}"

    def allows(self, video_id: str, query: Mapping[str, str]) -> bool:
        """Whether a download with this query string may proceed (always, without a TTL)."""
        if self._ttl is None:
            return True
        expires, signature = query.get("expires", ""), query.get("sig", "")
        expected = self._signature(video_id, expires).encode()
        if not expires.isdigit() or not hmac.compare_digest(signature.encode(), expected):
            return False
        return self._clock.unix_ms(self._clock.now()) < int(expires)
