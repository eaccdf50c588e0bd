"""What a ``batch`` run was asked to do, resolved from arguments and the environment once.

Credentials, the base URL and the backend's profile follow the SDK's one rule: the settings
build the :class:`KlingClient` the run will use (construction does no IO) and read what it
resolved (``base_url``, ``profile``), so the command line can never disagree with the client
about which account, host or limits a run uses. The SDK's refusals (a missing half of the
official key pair, a bad ``--base-url`` or ``KLING_BASE_URL``) are said in the command's own
words (:func:`_refusal`). Keys are never kept here beyond the ``--api-key`` the client is given
(the SDK reads the variables itself), never shown: the attrs classes keep it out of ``repr``,
and the backend identity written into the journal is the base URL without user info or query.

Everything is checked here, before the out directory or the journal is touched, including the
client's other settings: a setting that would make the run fail later must not leave a
journal behind that belongs to nothing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from kling_async import (
    COMETAPI,
    BackendProfile,
    JobStore,
    KlingClient,
    PollPolicy,
    RetryPolicy,
    UsageError,
    ValidationError,
)

from ._batch import DownloadSettings
from ._journal import journal_path
from ._prompts import Defaults

# The variables the SDK reads (documented in the README); named here for messages only.
ENV_API_KEY: Final = "KLING_API_KEY"
ENV_ACCESS_KEY: Final = "KLING_ACCESS_KEY"
ENV_SECRET_KEY: Final = "KLING_SECRET_KEY"  # noqa: S105 (a variable name, not a secret)
ENV_BASE_URL: Final = "KLING_BASE_URL"
#: The Redis URL of a batch shared by several machines, when not given with ``--redis``.
ENV_REDIS_URL: Final = "KLING_REDIS_URL"

__all__ = [
    "EMULATOR_STATE_NAME",
    "EMULATOR_TIME_SCALE",
    "NO_KEY_HINT",
    "ArgumentError",
    "BatchSettings",
    "allowed_hosts",
    "backend_identity",
    "client_arguments",
    "redacted_redis_url",
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

#: Stands in for a key while settings are checked without one (``--dry-run``, the no-key
#: error to come): explicit, so the environment is not read for it, and never sent.
_PLACEHOLDER_KEY: Final = "sk-placeholder"


class ArgumentError(Exception):
    """Arguments that cannot work together; reported in one line, exit status 2. (Not the
    SDK's :class:`kling_async.UsageError`, which is about using the client wrongly.)"""


def backend_identity(url: str) -> str:
    """Which server a journal's tasks live on: ``scheme://host[:port]/path`` of the base URL,
    without user info, query or a trailing slash (it is written into the journal and shown).

    The same words as the SDK's redaction of URLs in its messages; kept here, not imported,
    because it is the journal's format: a journal written by an earlier version must keep
    matching the backend it was run against, whatever the SDK's messages become."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def allowed_hosts(hosts: Sequence[str] | None) -> frozenset[str] | None:
    """``--allow-host`` values, lower case. The client's ``download`` checks them again by
    the SDK's rule; this only refuses an empty one before any file exists, in our words."""
    if hosts is None:
        return None
    normalised = set()
    for host in hosts:
        if not host.strip(".").strip():
            raise ArgumentError("--allow-host: an empty value (or dots only) is not a host name")
        normalised.add(host.strip().lower())
    return frozenset(normalised)


#: The SDK's words for a bad base URL, and ours (``error: --base-url (ftp://x) is not a
#: usable base URL: it must start with http:// or https://``); an unknown rule is quoted.
_URL_RULES: Final = (
    ("must not hold spaces", "it holds spaces or control characters"),
    ("cannot be parsed", "it cannot be parsed"),
    ("must be an http", "it must start with http:// or https://"),
    ("must name a host", "it names no host"),
    ("has port 0", "port 0 is not a port"),
    ("must have no query", "a base URL has no query or fragment"),
)


def _url_refusal(source: str, exc: ValidationError) -> ArgumentError:
    rule = exc.rule
    for prefix, ours in _URL_RULES:
        if rule.startswith(prefix):
            # "cannot be parsed (Port out of range 0-65535)": keep what the parser said.
            rule = ours + rule[len(prefix) :] if prefix == "cannot be parsed" else ours
            break
    shown = exc.value if isinstance(exc.value, str) and "://" in exc.value else ""
    where = f" ({shown})" if shown and shown != "<unparsable URL>" else ""
    return ArgumentError(f"{source}{where} is not a usable base URL: {rule}")


def _refusal(exc: ValidationError) -> ArgumentError:
    """The SDK's refusal of the credentials or the base URL, in the command's words."""
    if exc.field in (ENV_ACCESS_KEY, ENV_SECRET_KEY):
        return ArgumentError(
            f"{exc.field} is not set: Kling's API needs both the access and secret key"
        )
    if exc.field == "base_url":
        return _url_refusal("--base-url", exc)
    if exc.field == ENV_BASE_URL:
        return _url_refusal(ENV_BASE_URL, exc)
    return ArgumentError(f"{exc.field} {exc.rule}")  # exc.value is not shown: it may be a key


@attrs.frozen
class Account:
    """What the SDK resolved: the ``--api-key`` given (None: the SDK reads the variables),
    whether any key was found, the base URL and the backend's profile."""

    api_key: str | None = attrs.field(repr=False)
    has_key: bool
    base_url: str
    profile: BackendProfile


def resolve(api_key: str | None, base_url: str | None) -> Account:
    """``--api-key`` and ``--base-url`` over the environment, by the SDK's one rule; raises
    :class:`ArgumentError` in the command's words. Without any key, the base URL is still
    checked (``--dry-run`` works without one, and a bad URL is an error either way)."""
    key = api_key.strip() if api_key and api_key.strip() else None
    try:
        try:
            client = KlingClient(api_key=key, base_url=base_url)
        except ValidationError as exc:
            if exc.field != "credentials":
                raise
            client = KlingClient(api_key=_PLACEHOLDER_KEY, base_url=base_url)
            return Account(None, False, client.base_url, client.profile)
    except ValidationError as exc:
        raise _refusal(exc) from None
    except UsageError as exc:  # both kinds of key given explicitly
        raise ArgumentError(str(exc)) from None
    return Account(key, True, client.base_url, client.profile)


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
    #: ``--api-key`` (None: the SDK reads the variables); ``has_key``: a key was found.
    api_key: str | None = attrs.field(repr=False)
    has_key: bool
    #: The base URL the client resolved (None with ``--emulator``: the emulator's own).
    base_url: str | None
    #: The rules rows are validated against: the backend's, as the client applies them.
    profile: BackendProfile
    emulator: bool
    time_scale: float
    max_active: int | None
    downloads: DownloadSettings
    unreachable_after: float = 30.0
    retry_failed: bool
    #: ``--forget-durations``: the run starts from the poll policy's prior, not the journal's.
    forget_durations: bool = False
    #: ``--progress`` (``auto`` when not given).
    progress: str
    #: ``--json``: stdout is JSON lines (status changes, then a summary), nothing else.
    json: bool = False
    #: ``--quiet``: only errors and the last line; ``--verbose``: every row in the table.
    quiet: bool = False
    verbose: bool = False
    dry_run: bool = False
    #: ``--redis`` (or ``$KLING_REDIS_URL``): the batch is shared by the machines running it
    #: (None: this machine alone). It may hold a password: never shown, never written.
    redis_url: str | None = attrs.field(default=None, repr=False)
    #: ``--redis-lease``: a machine silent for half of it is taken for dead.
    redis_lease: float = 30.0

    @property
    def shared(self) -> bool:
        return self.redis_url is not None

    @property
    def backend(self) -> str:
        """Which server the journal's tasks live on (no secrets, no query string)."""
        if self.emulator or self.base_url is None:
            return "emulator"
        return backend_identity(self.base_url)


def redacted_redis_url(url: str) -> str:
    """``scheme://host[:port][/db]`` (or ``unix://path``): no user, password or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _redis_rule(url: str) -> str | None:
    """Why ``url`` cannot be a Redis URL, in our words (None: it can). No IO."""
    if not url.isprintable() or any(c.isspace() for c in url):
        return "it holds spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"it cannot be parsed ({exc})"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "it must start with redis://, rediss:// or unix://"
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL names the socket's path"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "port 0 is not a port"
    database = parts.path.strip("/")
    if database and not (database.isdigit() and int(database) < 100_000):
        return "the path is the database number (redis://HOST:PORT/0)"
    if parts.fragment:
        return "a Redis URL has no fragment"
    return None


def _redis_url(args: argparse.Namespace) -> str | None:
    """``--redis`` over ``$KLING_REDIS_URL``, checked (an empty value: not shared)."""
    given = getattr(args, "redis", None)
    source = "--redis"
    if given is None:
        given, source = os.environ.get(ENV_REDIS_URL), ENV_REDIS_URL
    url = (given or "").strip()
    if not url:
        return None
    shown = redacted_redis_url(url)
    where = f" ({shown})" if "://" in shown else ""
    rule = _redis_rule(url)
    if rule is None:
        try:
            from redis.asyncio.connection import parse_url
        except ImportError:
            raise ArgumentError(
                f"{source}: sharing a batch through Redis needs the redis extra: pip install "
                '"kling-async[cli,redis]"'
            ) from None
        try:
            parse_url(url)
        except (ValueError, TypeError) as exc:
            # redis-py's words name the rule, never the password.
            rule = f"redis-py refuses it ({exc})"
    if rule is not None:
        raise ArgumentError(f"{source}{where} is not a usable Redis URL: {rule}")
    if args.emulator:
        raise ArgumentError(
            f"{source}: --emulator runs an emulator inside this process, which no other "
            "machine can reach; start one with `kling-async emulator` and pass its URL as "
            "--base-url instead"
        )
    if args.retry_failed:
        raise ArgumentError(
            f"{source}: --retry-failed is not available for a batch shared through Redis "
            "(every machine would need the same new attempts); put the failed rows in a new "
            "prompt file, which is a new batch"
        )
    return url


def settings_from(args: argparse.Namespace) -> BatchSettings:
    """Resolve ``batch`` arguments and check them all; raises :class:`ArgumentError`."""
    if args.emulator and (args.api_key or args.base_url):
        raise ArgumentError("--emulator serves its own API: drop --api-key and --base-url")
    redis_url = _redis_url(args)
    account = None if args.emulator else resolve(args.api_key, args.base_url)
    allowed = allowed_hosts(args.allow_host)
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
        api_key=account.api_key if account is not None else None,
        has_key=account is not None and account.has_key,
        base_url=account.base_url if account is not None else None,
        profile=account.profile if account is not None else COMETAPI,
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
        forget_durations=args.forget_durations,
        progress=getattr(args, "progress", None) or "auto",
        json=getattr(args, "json", False),
        quiet=getattr(args, "quiet", False),
        verbose=getattr(args, "verbose", False),
        dry_run=args.dry_run,
        redis_url=redis_url,
        redis_lease=getattr(args, "redis_lease", None) or 30.0,
    )
    _check_client(settings)
    return settings


def client_arguments(
    settings: BatchSettings, api_key: str | None, base_url: str | None
) -> dict[str, Any]:
    """The arguments of the run's :class:`KlingClient` (one place: the check builds it too).
    ``api_key`` None lets the SDK read the key variables, as it did for the settings."""
    scale = settings.time_scale
    return {
        "api_key": api_key,
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
    api_key = settings.api_key if settings.has_key else _PLACEHOLDER_KEY
    base_url = "http://127.0.0.1" if settings.emulator else settings.base_url
    try:
        KlingClient(**client_arguments(settings, api_key, base_url))
    except ValidationError as exc:
        # exc.value is not shown: it may be a URL with user info, or a key.
        option = _OPTION_OF.get(exc.field.partition(".")[0], exc.field)
        raise ArgumentError(f"{option}: {exc.field} {exc.rule}") from None
    if settings.redis_url is not None:
        from kling_async.redis import RedisAccount

        try:
            RedisAccount(settings.redis_url, lease_ttl=settings.redis_lease)
        except ValidationError as exc:
            # Not exc.value: the URL may hold a password.
            raise ArgumentError(f"--redis: {exc.field} {exc.rule}") from None


@asynccontextmanager
async def open_client(
    settings: BatchSettings, *, store: JobStore | None = None
) -> AsyncIterator[KlingClient]:
    """The client for a run, keeping its jobs in ``store`` (the journal); with
    ``--emulator``, an emulator in this process behind it."""
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
            api_key: str | None = emulator.api_key
            base_url: str | None = emulator.url
        else:
            assert settings.has_key
            api_key, base_url = settings.api_key, settings.base_url
        client = KlingClient(**client_arguments(settings, api_key, base_url), store=store)
        kling = await stack.enter_async_context(client)
        if settings.forget_durations:
            await kling.forget_durations()
        yield kling
