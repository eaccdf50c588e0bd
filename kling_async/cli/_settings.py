"""What a ``batch`` run was asked to do, resolved from arguments and the environment once.

Credentials are resolved here and nowhere else, and never shown: the attrs classes keep them
out of ``repr``, and the backend identity written into the journal is the base URL without
user info or query string.

Everything is checked here, before the out directory or the journal is touched: the base URL
(from ``--base-url`` or ``KLING_BASE_URL``, through one check) and the client's settings, by
building the :class:`KlingClient` the run will use (construction does no IO). A setting that
would make the run fail later must not leave a journal behind that belongs to nothing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from kling_async import (
    COMETAPI,
    COMETAPI_BASE_URL,
    OFFICIAL,
    OFFICIAL_BASE_URL,
    BackendProfile,
    KlingClient,
    PollPolicy,
    RetryPolicy,
    ValidationError,
)
from kling_async.http.download import check_allowed_hosts
from kling_async.http.transport import redact_url

from ._batch import DownloadSettings
from ._journal import journal_path
from ._prompts import Defaults

# The variables the SDK reads (documented in the README); named here for messages only.
ENV_API_KEY: Final = "KLING_API_KEY"
ENV_ACCESS_KEY: Final = "KLING_ACCESS_KEY"
ENV_SECRET_KEY: Final = "KLING_SECRET_KEY"  # noqa: S105 (a variable name, not a secret)
ENV_BASE_URL: Final = "KLING_BASE_URL"

__all__ = [
    "EMULATOR_STATE_NAME",
    "EMULATOR_TIME_SCALE",
    "NO_KEY_HINT",
    "BatchSettings",
    "Credentials",
    "UsageError",
    "check_base_url",
    "client_arguments",
    "open_client",
    "settings_from",
]

#: With --emulator, the emulator's tasks are kept here in the out dir (see ``open_client``).
EMULATOR_STATE_NAME: Final = ".kling-emulator.sqlite3"

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


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a base URL, in words; None if nothing."""
    if any(character.isspace() or not character.isprintable() for character in url):
        return "it holds spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"it cannot be parsed ({exc})"
    if parts.scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "port 0 is not a port"
    if parts.query or parts.fragment:
        return "a base URL has no query or fragment"
    return None


def check_base_url(url: str, source: str) -> None:
    """Raise :class:`UsageError` unless ``url`` is an http(s) URL with a host and a valid
    port; ``source`` says where it came from (``--base-url``, ``KLING_BASE_URL``)."""
    problem = _url_problem(url)
    if problem is not None:
        shown = redact_url(url) if "://" in url else ""  # never user info or a query
        where = f" ({shown})" if shown and shown != "<unparsable URL>" else ""
        raise UsageError(f"{source}{where} is not a usable base URL: {problem}")


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
    unreachable_after: float = 30.0
    retry_failed: bool
    progress: str
    dry_run: bool = False

    @property
    def backend(self) -> str:
        """Which server the journal's tasks live on (no secrets, no query string)."""
        if self.emulator:
            return "emulator"
        url = self.base_url or (self.credentials or Credentials()).default_base_url
        return redact_url(url).rstrip("/")

    @property
    def profile(self) -> BackendProfile:
        """The rules rows are validated against: the backend's, as the client will apply."""
        return COMETAPI if self.emulator else (self.credentials or Credentials()).profile


def _base_url(args: argparse.Namespace, credentials: Credentials | None) -> str | None:
    """``--base-url``, else ``KLING_BASE_URL``, else the backend's default; checked alike."""
    if args.emulator:
        return None
    if args.base_url is not None:
        check_base_url(args.base_url, "--base-url")
        return str(args.base_url)
    from_env = os.environ.get(ENV_BASE_URL)
    if from_env:  # as the SDK reads it: an empty variable is unset
        check_base_url(from_env, ENV_BASE_URL)
        return from_env
    return (credentials or Credentials()).default_base_url


def settings_from(args: argparse.Namespace) -> BatchSettings:
    """Resolve ``batch`` arguments and check them all; raises :class:`UsageError`."""
    if args.emulator and (args.api_key or args.base_url):
        raise UsageError("--emulator serves its own API: drop --api-key and --base-url")
    credentials = None if args.emulator else credentials_from(args.api_key)
    base_url = _base_url(args, credentials)
    try:
        allowed = check_allowed_hosts(args.allow_host)
    except ValidationError as exc:
        raise UsageError(f"--allow-host: {exc}") from None
    scale = args.time_scale or (EMULATOR_TIME_SCALE if args.emulator else 1.0)
    out: Path = args.out
    settings = BatchSettings(
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
        base_url=base_url,
        emulator=args.emulator,
        time_scale=scale,
        max_active=args.max_active,
        unreachable_after=args.unreachable_after,
        downloads=DownloadSettings(
            max_bytes=args.max_file_size,
            allowed_hosts=allowed,
            allow_private=args.allow_private_downloads,
            timeout=args.download_timeout,
            concurrency=args.max_downloads,
            retry=scaled_retry(scale),
        ),
        retry_failed=args.retry_failed,
        progress=args.progress,
        dry_run=args.dry_run,
    )
    _check_client(settings)
    return settings


def client_arguments(
    settings: BatchSettings, credentials: Credentials, base_url: str | None
) -> dict[str, Any]:
    """The arguments of the run's :class:`KlingClient` (one place: the check builds it too)."""
    scale = settings.time_scale
    return {
        "api_key": credentials.api_key,
        "access_key": credentials.access_key,
        "secret_key": credentials.secret_key,
        "base_url": base_url,
        "poll": PollPolicy().scaled(scale) if scale != 1 else None,
        "retry": scaled_retry(scale),
        "settle_window": 5.0 * scale,
        "max_active_tasks": settings.max_active,
        "unreachable_after": settings.unreachable_after,
        # The SDK's default request cap, loosened in step with a time-scaled emulator.
        "max_requests_per_second": None if settings.emulator else 20.0 / scale,
        # The built-in emulator refuses a repeated external_task_id, so a re-sent create can
        # never make a second task there: no row of it is ever a possible duplicate.
        "profile": attrs.evolve(COMETAPI, repeated_external_id="reject")
        if settings.emulator
        else None,
    }


_OPTION_OF: Final = {
    "base_url": "the base URL",
    "max_active_tasks": "--max-active",
    "unreachable_after": "--unreachable-after",
    "poll": "--time-scale",
    "retry": "--time-scale",
    "settle_window": "--time-scale",
    "max_requests_per_second": "--time-scale",
}


def _check_client(settings: BatchSettings) -> None:
    """Build (and drop) the client the run would build: its checks, before any file exists.
    Without a key yet (``--dry-run``, or the no-key error to come) a placeholder stands in."""
    credentials = settings.credentials or Credentials(api_key="sk-placeholder")
    base_url = "http://127.0.0.1" if settings.emulator else settings.base_url
    try:
        KlingClient(**client_arguments(settings, credentials, base_url))
    except ValidationError as exc:
        # exc.value is not shown: it may be a URL with user info, or a key.
        option = _OPTION_OF.get(exc.field.partition(".")[0], exc.field)
        raise UsageError(f"{option}: {exc.field} {exc.rule}") from None


@asynccontextmanager
async def open_client(settings: BatchSettings) -> AsyncIterator[KlingClient]:
    """The client for a run; with ``--emulator``, an emulator in this process behind it."""
    scale = settings.time_scale
    async with AsyncExitStack() as stack:
        if settings.emulator:
            from ..testing import Emulator  # the server is loaded only for this mode

            # Its state lives in the out dir, so a killed run resumes against the same tasks.
            state = settings.out / EMULATOR_STATE_NAME
            seed = None if state.exists() else int.from_bytes(os.urandom(4), "big")
            emulator = await stack.enter_async_context(
                Emulator(time_scale=scale, seed=seed, state_path=state)
            )
            credentials = Credentials(api_key=emulator.api_key)
            base_url: str | None = emulator.url
        else:
            assert settings.credentials is not None
            credentials = settings.credentials
            base_url = settings.base_url
        client = KlingClient(**client_arguments(settings, credentials, base_url))
        yield await stack.enter_async_context(client)
