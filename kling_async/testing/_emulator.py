"""The :class:`Emulator` scope: a local Kling server for tests, benchmarks and offline batches."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

import aiohttp
import anyio
import anyio.abc
import attrs
from aiohttp import web

from ._admin import add_admin_routes
from ._auth import Authenticator
from ._callbacks import CallbackMode, CallbackScheduler
from ._clock import EmulatedClock
from ._faults import FaultInjector, Faults
from ._files import FileServer
from ._persist import StateFile, StateHeader, inspect_state_file, new_header
from ._ratelimit import TokenBucket
from ._server import (
    ACCOUNT_ERRORS,
    DuplicatePolicy,
    KlingServer,
    Settings,
    UnknownTaskStyle,
    check_duplicate_policy,
    check_visibility_lag,
)
from ._state import EmulatedTask, EmulatorStats, Lifecycle, TaskStore
from ._tls import client_context, server_context
from ._video import VideoLinks, check_result_url, format_host
from ._video import video_bytes as _video_bytes
from ._video import video_sha256 as _video_sha256

DEFAULT_API_KEY: Final = "sk-emulator-key"
DEFAULT_ACCESS_KEYS: Final[Mapping[str, str]] = MappingProxyType(
    # 32+ bytes: PyJWT warns (an error under `filterwarnings = error`) about shorter HS256 keys.
    {"ak-emulator": "sk-emulator-secret-for-hs256-jwt-signing"}
)
# In-flight handlers get this long to finish when the emulator closes; stalls end at once anyway.
_SHUTDOWN_TIMEOUT: Final = 5.0


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback IP address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"host must be a loopback address (127.0.0.0/8 or ::1), got {host!r}")
    return host


class Emulator:
    """A real Kling text-to-video server on loopback, with a scaled clock and ground truth.

    Use it as ``async with Emulator(time_scale=0.001) as emu:`` and point a client at
    ``emu.url`` (or ``emu.url + "/kling"``) with ``emu.api_key`` (CometAPI-style bearer key) or
    ``emu.access_key`` / ``emu.secret_key`` (official-API JWTs). Result files are served from a
    second port, ``emu.files_url``, as a CDN would serve them. Everything the emulator runs
    (both servers, the callback scheduler, the state file) lives in one task group: with
    ``async with`` that group belongs to the block (nothing outlives it, and a failure inside the
    emulator surfaces there). ``await emu.start()`` and ``await emu.aclose()`` do the same without
    a block, for code that cannot nest one (a portal, a fixture split across tasks): the group is
    then hosted by one task the emulator owns, which ``aclose()`` ends and waits for (re-raising
    a failure), so a started emulator must be closed.

    Times are in *emulated* seconds: one lasts ``time_scale`` real seconds. The wire timestamps
    are wall-clock Unix milliseconds of those instants (real time, see ``EmulatedClock``). Task
    durations, outcomes, ids and faults are drawn from ``seed`` (default 0, or a state file's
    own), so a run is reproducible.

    Knobs (all keyword-only):

    - ``time_scale``: real seconds per emulated second (``0.001``: a 90 s task takes 90 ms).
    - ``median_duration``, ``duration_sigma``: log-normal task durations (emulated seconds, std
      mode, 5 s clip); ``pro_factor`` and ``long_factor`` slow down pro mode and longer clips;
      ``queue_fraction`` of each duration is spent ``submitted`` before ``processing``.
    - ``failure_rate``: fraction of tasks that end ``failed``.
    - ``concurrency_limit``: account slots; a create over it gets 429/1303 and creates nothing.
    - ``rate_limit`` / ``rate_burst``: requests per real second over the API (429/1302).
    - ``duplicate_external_id``: a repeated ``external_task_id`` is rejected (400/1201),
      answered with the first task (``return_first``), or creates another task (``allow``);
      changeable with :meth:`set_duplicate_policy`. The check sees every task, visible or not.
    - ``visibility_lag``: emulated seconds a new task stays invisible to lookups by
      ``external_task_id`` (all three forms) and to the list; a GET by task id sees it at once.
      Changeable with :meth:`set_visibility_lag` (for tasks created from then on).
    - ``strict_auth``: pair credentials with path families as the real services do: bearer keys
      only on ``/kling/...`` (a JWT gets CometAPI's 401 ``invalid_api_key``), JWTs only on
      ``/v1/...`` (a key gets 401/1000).
    - ``cometapi_lookups``: when False, ``/kling/...`` serves neither the list nor lookups by
      external id (CometAPI documents neither): 404 ``invalid_url``, and ``/{id}`` is a task id
      only. ``/v1/...`` is unaffected.
    - ``unknown_task``: how a missing task is answered: 400/1201, 404/1203, or new-api's
      ``{"code": "task_not_exist"}``.
    - ``callbacks``: POST every status change, only the terminal one, or ``chaotic`` (every
      change, some duplicated, some after the terminal one).
    - ``faults``: seeded :class:`Faults`; changeable with :meth:`set_faults`.
    - ``api_keys``, ``access_keys``: accepted bearer keys and access-key -> secret pairs.
    - ``wall_clock``: the time JWT ``exp``/``nbf`` are checked against (tests drive expiry).
    - ``url_ttl``: emulated seconds a video URL stays valid (``None``: forever).
    - ``download_rate``: bytes per real second files are served at (``None``: at once), to
      catch a client mid-download.
    - ``files_tls``: serve the file origin over https with the shipped self-signed certificate;
      :meth:`ssl_context` gives clients a context that trusts it. ``files_port``: its port.
    - ``state_path``: keep the tasks in this SQLite file, durably written before each create is
      answered, and load them at start: a restarted emulator (after ``kill -9`` too, with any
      ``time_scale``) is the same account. ``seed`` then defaults to the file's seed.
    - ``admin``: also serve the control endpoints under ``/_emulator`` (ground truth and knobs
      over HTTP, for tests that drive the emulator from another process; see ``_admin``).
    - ``host``, ``port``: a loopback address only; port 0 picks a free one. The file origin
      binds the same address.
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        seed: int | None = None,
        median_duration: float = 90.0,
        duration_sigma: float = 0.35,
        pro_factor: float = 1.6,
        long_factor: float = 1.5,
        queue_fraction: float = 0.1,
        failure_rate: float = 0.0,
        concurrency_limit: int | None = None,
        rate_limit: float | None = None,
        rate_burst: int = 10,
        duplicate_external_id: DuplicatePolicy = "reject",
        visibility_lag: float = 0.0,
        unknown_task: UnknownTaskStyle = "kling_1201",
        callbacks: CallbackMode = "every",
        faults: Faults | None = None,
        api_keys: Sequence[str] = (DEFAULT_API_KEY,),
        access_keys: Mapping[str, str] = DEFAULT_ACCESS_KEYS,
        wall_clock: Callable[[], float] = time.time,
        url_ttl: float | None = None,
        download_rate: float | None = None,
        strict_auth: bool = False,
        cometapi_lookups: bool = True,
        files_tls: bool = False,
        files_port: int = 0,
        state_path: str | os.PathLike[str] | None = None,
        admin: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if isinstance(api_keys, str):
            raise TypeError("api_keys must be a sequence of keys, not one string")
        duplicate_external_id = check_duplicate_policy(duplicate_external_id)
        visibility_lag = check_visibility_lag(visibility_lag)
        if unknown_task not in ("kling_1201", "kling_1203", "new_api"):
            raise ValueError(f"unknown unknown_task style {unknown_task!r}")
        if callbacks not in ("every", "terminal", "chaotic"):
            raise ValueError(f"unknown callbacks mode {callbacks!r}")
        _check_limit(concurrency_limit)
        _check_rate(download_rate)

        self._host = _loopback_host(host)
        self._port = port
        self._files_port = files_port
        self._files_tls = files_tls
        self._clock = EmulatedClock(time_scale)
        self._state: StateFile | None = None
        self._header: StateHeader | None = None
        if state_path is not None:
            found = inspect_state_file(state_path)
            if found is not None and seed is not None and seed != found.seed:
                raise ValueError(
                    f"state file {os.fspath(state_path)!r} was made with seed {found.seed}, "
                    f"not {seed}: its video bytes and ids follow that seed (omit seed to use it)"
                )
            self._header = found or new_header(0 if seed is None else seed)
            self._state = StateFile(state_path, clock=self._clock)
            seed = self._header.seed
        seed = 0 if seed is None else seed
        self._seed = seed
        self._api_keys = tuple(api_keys)
        self._access_keys = dict(access_keys)
        self._stats = EmulatorStats()
        self._store = TaskStore(
            seed=seed,
            stream=0 if self._header is None else self._header.sessions,
            lifecycle=Lifecycle(
                median_duration=median_duration,
                duration_sigma=duration_sigma,
                pro_factor=pro_factor,
                long_factor=long_factor,
                queue_fraction=queue_fraction,
                failure_rate=failure_rate,
            ),
        )
        self._faults = FaultInjector(faults, seed=seed)
        if self._state is not None:
            self._state.track(self._store.unsaved)
        self._links = VideoLinks(
            clock=self._clock, ttl=url_ttl, key=None if self._header is None else self._header.key
        )
        self._links.bind_host = self._host
        self._links.scheme = "https" if files_tls else "http"
        self._settings = Settings(
            concurrency_limit=concurrency_limit,
            forced_account_error=None,
            duplicate_external_id=duplicate_external_id,
            unknown_task=unknown_task,
            download_rate=download_rate,
            visibility_lag=visibility_lag,
            cometapi_lookups=cometapi_lookups,
        )
        self._admin = admin
        self._closing = asyncio.Event()
        self._stop = asyncio.Event()
        self._callbacks = CallbackScheduler(
            mode=callbacks,
            seed=seed,
            clock=self._clock,
            stats=self._stats,
            tasks=self._store.tasks,
            render=lambda task, at: self._server.render(task, at),
        )
        self._server = KlingServer(
            seed=seed,
            clock=self._clock,
            store=self._store,
            stats=self._stats,
            auth=Authenticator(
                api_keys=self._api_keys,
                access_keys=self._access_keys,
                wall_clock=wall_clock,
                strict=strict_auth,
            ),
            faults=self._faults,
            limiter=None if rate_limit is None else TokenBucket(rate_limit, rate_burst),
            callbacks=self._callbacks,
            links=self._links,
            settings=self._settings,
            closing=self._closing,
            persist=self._state,
        )
        self._files = FileServer(
            seed=seed,
            clock=self._clock,
            store=self._store,
            stats=self._stats,
            faults=self._faults,
            links=self._links,
            settings=self._settings,
            closing=self._closing,
        )
        self._url: str | None = None
        self._files_url: str | None = None
        self._started = False
        self._closed = False
        self._finished = asyncio.Event()  # set when _serve has stopped everything it started
        # The block form's task group (entered by __aenter__, exited by __aexit__) ...
        self._scope: AsyncExitStack | None = None
        # ... or the task that hosts the same group for start() / aclose().
        self._owner: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._claim()
        stack = AsyncExitStack()
        task_group = await stack.enter_async_context(anyio.create_task_group())
        try:
            url = await task_group.start(self._serve, name="kling-emulator")
        except BaseException:
            # It never served (the port is taken, ...): leave the empty group and raise the
            # cause itself, not a group around it.
            self._closed = True
            await stack.aclose()
            raise
        self._scope = stack
        self._ready(url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        scope, self._scope = self._scope, None
        # Stop first, then leave the group: the servers shut down in order (in-flight handlers
        # finish, stalls end) instead of being cancelled because the block raised.
        await self.aclose()
        if scope is None:
            return None
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return await scope.__aexit__(exc_type, exc, traceback)  # its own, or passing through
        # Nothing of the group runs any more, so leaving it can raise only the emulator's own
        # failure; the block's exception goes on as itself, not wrapped in an ExceptionGroup.
        await scope.__aexit__(None, None, None)
        return None

    async def start(self) -> None:
        """Bind the port and start serving; returns once ``url`` is valid.

        The non-block form of ``async with``: the emulator's task group is hosted by one task
        it owns until :meth:`aclose`, which must follow.
        """
        self._claim()
        url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        host = asyncio.create_task(self._hosted(url), name="kling-emulator-host")
        self._owner = host
        try:
            waiters: set[asyncio.Future[Any]] = {url, host}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.aclose()
            if url.done():
                url.exception()  # seen: whatever it holds is not "never retrieved"
            raise
        if url.done() and url.exception() is None:
            self._ready(url.result())
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await host  # ended or ending: it never served; re-raises a failure of its own
        url.result()  # re-raises why it could not start (e.g. the port is taken)
        raise RuntimeError("the emulator stopped before it was ready")

    async def _hosted(self, url: asyncio.Future[str]) -> None:
        """The one task of the non-block form: it holds the group that runs everything."""
        async with anyio.create_task_group() as task_group:
            try:
                address = await task_group.start(self._serve, name="kling-emulator")
            except Exception as exc:  # it never served: start() raises the cause itself
                url.set_exception(exc)
                return
            url.set_result(address)

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("this Emulator was already started; create a new one")
        self._started = True

    def _ready(self, url: str) -> None:
        self._url = url
        self._files_url = self._links.origin()

    async def aclose(self) -> None:
        """Stop serving and wait until everything the emulator started has ended. Idempotent.

        Inside ``async with`` it stops the emulator early (the block's end then has nothing
        left to wait for).
        """
        if not self._started or self._closed:
            return
        self._closed = True
        self._stop.set()
        # Shielded: a caller being cancelled must still leave nothing running behind it, and the
        # shutdown is bounded (stalls end at once, handlers get _SHUTDOWN_TIMEOUT at most).
        with anyio.CancelScope(shield=True):
            if self._owner is not None:
                await self._owner  # re-raises a failure of the emulator
            else:
                await self._finished.wait()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[str]) -> None:
        """The one task that owns both servers, the callback scheduler and the state file.

        It reports the API's URL once both servers listen, then serves until ``_stop``.
        """
        try:
            await self._run_servers(task_status)
        finally:
            self._finished.set()

    async def _run_servers(self, task_status: anyio.abc.TaskStatus[str]) -> None:
        app = self._server.application()
        if self._admin:
            add_admin_routes(app, self)
        runners = [
            web.AppRunner(
                application,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=_SHUTDOWN_TIMEOUT,
            )
            for application in (app, self._files.application())
        ]
        api, files = runners
        set_up: list[web.AppRunner] = []
        session: aiohttp.ClientSession | None = None
        try:
            self._clock.start()
            await self._load_state()
            for runner in runners:
                await runner.setup()
                set_up.append(runner)
            await web.TCPSite(api, self._host, self._port).start()
            tls = server_context() if self._files_tls else None
            await web.TCPSite(files, self._host, self._files_port, ssl_context=tls).start()
            host, port = api.addresses[0][:2]
            self._links.port = files.addresses[0][1]
            url = f"http://{format_host(host)}:{port}"
            # The callbacks' session outlives their task group: it closes in the shielded
            # cleanup below, so even a cancelled emulator leaves no unclosed session behind.
            session = aiohttp.ClientSession()
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._callbacks.run, session, name="kling-emulator-callbacks")
                task_status.started(url)
                await self._stop.wait()
                task_group.cancel_scope.cancel()
        finally:
            self._closing.set()
            with anyio.CancelScope(shield=True):
                if session is not None:
                    await session.close()
                for runner in set_up:
                    await runner.cleanup()
                if self._state is not None:
                    await self._state.aclose()

    async def _load_state(self) -> None:
        """Open the state file and take in its tasks, as this account's ground truth."""
        if self._state is None or self._header is None:
            return
        loaded = await self._state.open(self._header)
        now = self._clock.now()
        stats = self._stats
        for task in loaded:
            self._store.add(task)
            stats.tasks_created += 1
            if task.external_task_id is not None:
                stats.created_per_external_id[task.external_task_id] += 1
            self._callbacks.schedule(task, after=now)
        stats.peak_active = self._store.active_count(now)

    # -- addresses and credentials -----------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); the ``/kling`` family is under it too."""
        if self._url is None:
            raise RuntimeError("the Emulator is not started yet: use `async with` or start()")
        return self._url

    @property
    def files_url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with ``files_tls``): the file origin.

        Result URLs name the host the client used to reach the API (``localhost`` or
        ``127.0.0.1``), so theirs may differ from this in the host name, never in the port.
        """
        if self._files_url is None:
            raise RuntimeError("the Emulator is not started yet: use `async with` or start()")
        return self._files_url

    def ssl_context(self) -> ssl.SSLContext:
        """A client ``SSLContext`` that verifies the file origin's shipped certificate.

        Full verification (host name included) against that one certificate and nothing else,
        e.g. ``aiohttp.TCPConnector(ssl=emu.ssl_context())``. Usable with or without
        ``files_tls`` and before start.
        """
        return client_context()

    @property
    def api_key(self) -> str:
        """The first accepted bearer key (CometAPI style)."""
        if not self._api_keys:
            raise RuntimeError("this Emulator was given no api_keys")
        return self._api_keys[0]

    @property
    def access_key(self) -> str:
        """The first access key for official-API JWTs."""
        if not self._access_keys:
            raise RuntimeError("this Emulator was given no access_keys")
        return next(iter(self._access_keys))

    @property
    def secret_key(self) -> str:
        """The secret that signs JWTs for :attr:`access_key`."""
        return self._access_keys[self.access_key]

    @property
    def time_scale(self) -> float:
        """Real seconds per emulated second."""
        return self._clock.time_scale

    # -- ground truth ------------------------------------------------------------------------

    def now(self) -> float:
        """Emulated seconds since the emulator started."""
        return self._clock.now()

    @property
    def stats(self) -> EmulatorStats:
        """Live ground truth (it keeps changing; copy what you compare)."""
        return self._stats

    @property
    def tasks(self) -> Mapping[str, EmulatedTask]:
        """Every task created (and loaded from a state file), by task id (a read-only live view)."""
        return MappingProxyType(self._store.tasks)

    def active_tasks(self) -> int:
        """Tasks holding an account slot now (created and not completed)."""
        return self._store.active_count(self._clock.now())

    @property
    def seed(self) -> int:
        """The seed in use (a state file's own, when one was given without a seed)."""
        return self._seed

    def video_bytes(self, video_id: str) -> bytes:
        """The exact bytes ``GET {files_url}/files/{video_id}.mp4`` serves: a playable MP4.

        KeyError for an unknown id.
        """
        if self._store.video_owner(video_id) is None:
            raise KeyError(video_id)
        return _video_bytes(self._seed, video_id)

    def video_sha256(self, video_id: str) -> str:
        """Hex SHA-256 of :meth:`video_bytes`."""
        if self._store.video_owner(video_id) is None:
            raise KeyError(video_id)
        return _video_sha256(self._seed, video_id)

    # -- knobs -------------------------------------------------------------------------------

    def force_account_error(self, code: int | None) -> None:
        """Answer every create with an account-level error until called with ``None``.

        ``1100``, ``1101``, ``1102`` and ``1304`` are HTTP 429, ``1103`` is HTTP 403; no task is
        created. These are the errors a client must treat as fatal for the account.
        """
        if code is not None and code not in ACCOUNT_ERRORS:
            raise ValueError(f"code must be one of {sorted(ACCOUNT_ERRORS)} or None, got {code!r}")
        self._settings.forced_account_error = code

    def set_concurrency_limit(self, limit: int | None) -> None:
        """Change the account's parallel-task limit (``None``: unlimited) from now on."""
        _check_limit(limit)
        self._settings.concurrency_limit = limit

    def set_faults(self, faults: Faults | None) -> None:
        """Replace the fault rates from the next request on (``None``: no faults)."""
        self._faults.faults = faults

    def set_lifecycle(
        self, *, failure_rate: float | None = None, median_duration: float | None = None
    ) -> None:
        """Change how tasks created from now on are drawn; tasks already created keep theirs."""
        changes: dict[str, float] = {}
        if failure_rate is not None:
            changes["failure_rate"] = failure_rate
        if median_duration is not None:
            changes["median_duration"] = median_duration
        self._store.lifecycle = attrs.evolve(self._store.lifecycle, **changes)

    def set_download_rate(self, rate: float | None) -> None:
        """Serve files at ``rate`` bytes per real second from now on (``None``: at once)."""
        _check_rate(rate)
        self._settings.download_rate = rate

    def set_url_ttl(self, ttl: float | None) -> None:
        """Video URLs handed out from now on live ``ttl`` emulated seconds (``None``: forever).

        Setting a TTL also invalidates the unsigned URLs handed out before, the way an expired
        URL stops working: the client must GET the task again for a fresh one.
        """
        self._links.ttl = ttl

    def set_visibility_lag(self, lag: float) -> None:
        """Tasks created from now on stay invisible to lookups by external id and to the list
        for ``lag`` emulated seconds (0: visible at once). Tasks already created keep theirs."""
        self._settings.visibility_lag = check_visibility_lag(lag)

    def set_duplicate_policy(self, policy: DuplicatePolicy) -> None:
        """What a create with an already used ``external_task_id`` gets, from now on."""
        self._settings.duplicate_external_id = check_duplicate_policy(policy)

    def set_result_url(self, template: str | None) -> None:
        """Hand out ``template.format(video_id=..., files=<file origin>)`` as every video URL.

        A test hook for hostile result URLs: with
        ``"http://169.254.169.254/latest/meta-data/{video_id}"`` (a cloud metadata address),
        ``"file:///etc/passwd"`` or ``"{files}/../../secret"``, a test checks that the client
        refuses an untrusted URL instead of fetching it. ``None`` restores the real URLs. The
        emulator serves nothing at such URLs; it only hands them out (in GETs, lists and
        callbacks alike).
        """
        self._links.template = check_result_url(template)

    def settings_snapshot(self) -> dict[str, Any]:
        """The knobs a test may turn while the emulator runs, as plain values."""
        lifecycle = self._store.lifecycle
        settings = self._settings
        return {
            "failure_rate": lifecycle.failure_rate,
            "median_duration": lifecycle.median_duration,
            "concurrency_limit": settings.concurrency_limit,
            "account_error": settings.forced_account_error,
            "download_rate": settings.download_rate,
            "url_ttl": self._links.ttl,
            "visibility_lag": settings.visibility_lag,
            "duplicate_external_id": settings.duplicate_external_id,
            "result_url": self._links.template,
        }


def _check_rate(rate: float | None) -> None:
    if rate is not None and not (isinstance(rate, int | float) and rate > 0):
        raise ValueError(f"download_rate must be a number of bytes per second > 0, got {rate!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"concurrency_limit must be an int >= 0 or None, got {limit!r}")
