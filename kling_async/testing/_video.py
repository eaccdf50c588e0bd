"""Result files: deterministic MP4-looking bytes and expiring, signed download links.

Clients download and checksum results, so the bytes must be knowable in advance (a function of
the seed and the video id) and look like an MP4 to anything that sniffs the first box. Real
result URLs are hotlink-protected and expire; ``url_ttl`` reproduces that with an HMAC over the
video id and the expiry, so a client that keeps a stale URL gets a 403 and must GET the task again.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import struct
from collections.abc import Mapping

from ._clock import EmulatedClock

_FTYP = struct.pack(">I4s4sI", 32, b"ftyp", b"isom", 0x200) + b"isomiso2avc1mp41"


def video_bytes(seed: int, video_id: str) -> bytes:
    """A small file: an ``ftyp`` box then an ``mdat`` box of seeded bytes (2 to 8 KiB in all)."""
    rng = random.Random(f"kling-emulator-video:{seed}:{video_id}")
    size = 2048 + rng.randrange(6144)
    return _FTYP + struct.pack(">I4s", 8 + size, b"mdat") + rng.randbytes(size)


def video_sha256(seed: int, video_id: str) -> str:
    return hashlib.sha256(video_bytes(seed, video_id)).hexdigest()


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"url_ttl must be > 0 emulated seconds or None, got {ttl!r}")
    return ttl


class VideoLinks:
    """Builds and checks the absolute URLs put in ``task_result.videos[].url``."""

    def __init__(self, *, clock: EmulatedClock, ttl: float | None) -> None:
        self._clock = clock
        self._ttl = _check_ttl(ttl)
        self._key = secrets.token_bytes(32)
        self.base_url = ""

    @property
    def ttl(self) -> float | None:
        return self._ttl

    @ttl.setter
    def ttl(self, ttl: float | None) -> None:
        """Change the TTL from now on; URLs handed out before without a signature stop working
        once a TTL is set, as a CDN that starts signing would refuse them."""
        self._ttl = _check_ttl(ttl)

    def _signature(self, video_id: str, expires: str) -> str:
        message = f"{video_id}:{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def url(self, video_id: str) -> str:
        """A fresh URL; with a TTL it is valid for ``ttl`` emulated seconds from now."""
        url = f"{self.base_url}/files/{video_id}.mp4"
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
