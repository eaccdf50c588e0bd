"""What a ``batch`` run was asked to do, resolved from arguments and the environment once.

Credentials are resolved here and nowhere else, and never shown: the attrs classes keep them
out of ``repr``, and the backend identity written into the journal is the base URL without
user info or query string.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final

import attrs

from .._auth import ENV_ACCESS_KEY, ENV_API_KEY, ENV_BASE_URL, ENV_SECRET_KEY
from .._client import COMETAPI_BASE_URL, OFFICIAL_BASE_URL, KlingClient
from .._download import check_allowed_hosts
from .._errors import ValidationError
from .._http import redact_url
from .._poll import PollPolicy
from .._profiles import COMETAPI, OFFICIAL, BackendProfile
from .._retry import RetryPolicy
from ._batch import DownloadSettings
from ._journal import journal_path
from ._prompts import Defaults

__all__ = [
    "EMULATOR_TIME_SCALE",
    "NO_KEY_HINT",
    "BatchSettings",
    "Credentials",
    "UsageError",
    "open_client",
    "settings_from",
]

#: With --emulator: a 90 s task takes 1.8 s, so the example batch finishes in seconds.
EMULATOR_TIME_SCALE: Final = 0.02

NO_KEY_HINT: Final = (
    f"no API key: set {ENV_API_KEY} (CometAPI) or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} "
    "(Kling's API), or pass --api-key; to try it without an account, add --emulator"
)


class UsageError(Exception):
    """Arguments that cannot work together; reported in one line, exit status 2."""


@attrs.frozen
class Credentials:
    """What the client authenticates with; secrets never in repr."""

    api_key: str | None = attrs.field(default=None, repr=False)
    access_key: str | None = attrs.field(default=None, repr=False)
    secret_key: str | None = attrs.field(default=None, repr=False)

    @property
    def profile(self) -> BackendProfile:
        return OFFICIAL if self.access_key is not None else COMETAPI

    @property
    def default_base_url(self) -> str:
        return OFFICIAL_BASE_URL if self.access_key is not None else COMETAPI_BASE_URL


def credentials_from(api_key: str | None) -> Credentials | None:
    """``--api-key``, else the documented variables (as the SDK reads them); None if none."""
    if api_key and api_key.strip():
        return Credentials(api_key=api_key.strip())
    env_key = os.environ.get(ENV_API_KEY, "").strip()
    if env_key:
        return Credentials(api_key=env_key)
    access = os.environ.get(ENV_ACCESS_KEY, "").strip()
    secret = os.environ.get(ENV_SECRET_KEY, "").strip()
    if access and secret:
        return Credentials(access_key=access, secret_key=secret)
    if access or secret:
        missing = ENV_SECRET_KEY if access else ENV_ACCESS_KEY
        raise UsageError(f"{missing} is not set: Kling's API needs both the access and secret key")
    return None


def scaled_retry(scale: float) -> RetryPolicy:
    """The default retry policy, faster in proportion for a time-scaled emulator."""
    if scale == 1:
        return RetryPolicy()
    return RetryPolicy(
        initial=max(0.001, 0.5 * scale),
        maximum=max(0.01, 30.0 * scale),
        throttle_minimum=1.0 * scale,
    )


@attrs.frozen(kw_only=True)
class BatchSettings:
    prompts: Path
    out: Path
    journal: Path
    defaults: Defaults
    credentials: Credentials | None
    base_url: str | None
    emulator: bool
    time_scale: float
    max_active: int | None
    downloads: DownloadSettings
    retry_failed: bool
    progress: str
    dry_run: bool = False

    @property
    def backend(self) -> str:
        """Which server the journal's tasks live on (no secrets, no query string)."""
        if self.emulator:
            return "emulator"
        credentials = self.credentials or Credentials()
        url = self.base_url or os.environ.get(ENV_BASE_URL) or credentials.default_base_url
        return redact_url(url).rstrip("/")

    @property
    def profile(self) -> BackendProfile:
        """The rules rows are validated against: the backend's, as the client will apply."""
        return COMETAPI if self.emulator else (self.credentials or Credentials()).profile


def settings_from(args: argparse.Namespace) -> BatchSettings:
    """Resolve ``batch`` arguments; raises :class:`UsageError`."""
    if args.emulator and (args.api_key or args.base_url):
        raise UsageError("--emulator serves its own API: drop --api-key and --base-url")
    credentials = None if args.emulator else credentials_from(args.api_key)
    if args.base_url is not None and not args.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url {redact_url(args.base_url)} must be an http(s) URL")
    try:
        allowed = check_allowed_hosts(args.allow_host)
    except ValidationError as exc:
        raise UsageError(f"--allow-host: {exc}") from None
    scale = args.time_scale or (EMULATOR_TIME_SCALE if args.emulator else 1.0)
    out: Path = args.out
    return BatchSettings(
        prompts=args.prompts,
        out=out,
        journal=journal_path(out, args.journal),
        defaults=Defaults(
            model_name=args.model,
            mode=args.mode,
            duration=args.duration,
            aspect_ratio=args.aspect_ratio,
        ),
        credentials=credentials,
        base_url=args.base_url,
        emulator=args.emulator,
        time_scale=scale,
        max_active=args.max_active,
        downloads=DownloadSettings(
            max_bytes=args.max_file_size,
            allowed_hosts=allowed,
            concurrency=args.max_downloads,
            retry=scaled_retry(scale),
        ),
        retry_failed=args.retry_failed,
        progress=args.progress,
        dry_run=args.dry_run,
    )


@asynccontextmanager
async def open_client(settings: BatchSettings) -> AsyncIterator[KlingClient]:
    """The client for a run; with ``--emulator``, an emulator in this process behind it."""
    scale = settings.time_scale
    async with AsyncExitStack() as stack:
        if settings.emulator:
            from ..testing import Emulator  # the server is loaded only for this mode

            emulator = await stack.enter_async_context(
                Emulator(time_scale=scale, seed=int.from_bytes(os.urandom(4), "big"))
            )
            credentials = Credentials(api_key=emulator.api_key)
            base_url: str | None = emulator.url
        else:
            assert settings.credentials is not None
            credentials = settings.credentials
            base_url = settings.base_url
        client = KlingClient(
            api_key=credentials.api_key,
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            base_url=base_url,
            poll=PollPolicy().scaled(scale) if scale != 1 else None,
            retry=scaled_retry(scale),
            settle_window=5.0 * scale,
            max_active_tasks=settings.max_active,
            # The SDK's default request cap, loosened in step with a time-scaled emulator.
            max_requests_per_second=None if settings.emulator else 20.0 / scale,
        )
        yield await stack.enter_async_context(client)
