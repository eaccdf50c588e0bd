"""``batch --redis URL``: one batch split between the machines that run it, through Redis.

Every machine runs the same command on the same prompt file, each with its own ``--out DIR``
(its journal, its clips). What makes that one batch, done exactly once:

* **One batch id, one set of ids.** The batch id is a hash of the backend and of the rows'
  keys (each the SHA-256 of exactly what would be sent, and its occurrence; or the row's own
  ``external_task_id``), so every machine with the same file (and the same request defaults)
  computes the same id, and its journal gives row N the same ``external_task_id``
  (``kb-<batch>-N``) on every machine.
* **Rows are claimed, atomically, as slots free.** A claim is a Lua script over the batch's
  ``claims`` hash (row id -> machine): it takes the first unclaimed rows of a chunk, in file
  order, and reports who holds the others. A machine claims only while fewer than
  ``CLAIM_AHEAD`` (4) of its rows wait for a slot, so a machine that gets slots faster takes
  more rows; it submits only the rows it claimed.
* **A machine that dies loses its rows to a live one.** Each machine heartbeats (a sorted
  set of expiries, every sixth of ``--redis-lease``); the rows of one silent for half a lease
  (or that left: it says so on the way out) are moved to a live machine by another Lua script.
  Their jobs are the account's (``RedisAccount``): the new holder's client follows the job
  whatever client owns it now (adopted by a live client of the account, looked up by its
  external id before any create, so never created twice), and downloads the clip into its own
  out dir. A job that had ended with no task on the dead machine (an unreachable host, say)
  is let go first (:meth:`RedisAccount.release_ended`), then sent again, looked up first.
* **Machines wait for each other.** A machine ends once no row is unclaimed, its own rows have
  ended, and no other live machine still works on rows: until then it stays, ready to take
  over the rows of one that dies.
* **What is final is said once.** A row done (its clip renamed into place), failed or
  rejected is written to the batch's ``final`` hash by its holder at once (the journal
  follows); so a rerun of any machine knows what the batch did, and the summary counts the
  whole batch. A machine that dies between saving a clip and saying so (a few milliseconds)
  leaves that row to the machine that takes it over, which fetches the clip again: the only
  way a clip lands in two out dirs. The task is never created twice.

Everything under the account's prefix (``RedisAccount.prefix``, one hash tag), beside the
client's own keys: ``batch:<id>:info``, ``:claims``, ``:final``, ``:machines``, ``:busy``,
``:held:<machine>`` (the rows a machine holds and has not finished), each kept for 7 days
after the last heartbeat. No key or URL password is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import attrs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

import kling_async as ka
from kling_async.redis import RedisAccount

from ._prompts import PromptRow
from ._settings import BatchSettings, client_arguments

__all__ = [
    "Claimed",
    "Look",
    "Owner",
    "SharedBatch",
    "SharedError",
    "check_reachable",
    "machine_name",
    "shared_batch_id",
    "shared_client",
]

#: How long the batch's keys outlive the last heartbeat (the client's finished_ttl).
KEEP_SECONDS: Final = 7 * 86400
_CHUNK: Final = 500

_NOW_MS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: info, machines, busy, claims, final, held
# ARGV: me, dead_after_ms, busy, registered (0/1), rows, keep_s, expect (0/1)
_HEARTBEAT: Final = (
    _NOW_MS
    + """
local lost = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'rows', ARGV[5], 'created', now)
  if ARGV[7] == '1' then
    lost = 1
    redis.call('HSET', KEYS[1], 'lookup', 1)
  end
end
local lookup = redis.call('HGET', KEYS[1], 'lookup') or '0'
if ARGV[4] == '1' and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return {'evicted', lost, lookup}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[6])) end
return {'ok', lost, lookup}
"""
)

# KEYS: claims, held, final, busy; ARGV: me, want, ids...
_CLAIM: Final = """
local me, want = ARGV[1], tonumber(ARGV[2])
local examined, fresh, mine, taken = 0, {}, {}, {}
for i = 3, #ARGV do
  if #fresh + #mine >= want then break end
  local id = ARGV[i]
  examined = examined + 1
  local owner = redis.call('HGET', KEYS[1], id)
  if not owner then
    redis.call('HSET', KEYS[1], id, me)
    redis.call('SADD', KEYS[2], id)
    table.insert(fresh, id)
  elseif owner == me then
    if redis.call('HEXISTS', KEYS[3], id) == 0 then redis.call('SADD', KEYS[2], id) end
    table.insert(mine, id)
  else
    table.insert(taken, id)
    table.insert(taken, owner)
  end
end
if #fresh + #mine > 0 then redis.call('HINCRBY', KEYS[4], me, #fresh + #mine) end
return {examined, fresh, mine, taken}
"""

# KEYS: machines, claims, busy; ARGV: me, prefix of the held sets
_LOOK: Final = (
    _NOW_MS
    + """
local me, prefix = ARGV[1], ARGV[2]
local adopted, from = {}, {}
for _, machine in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if machine ~= me then
    local set = prefix .. machine
    local n = 0
    for _, id in ipairs(redis.call('SMEMBERS', set)) do
      if redis.call('HGET', KEYS[2], id) == machine then
        redis.call('HSET', KEYS[2], id, me)
        redis.call('SADD', prefix .. me, id)
        table.insert(adopted, id)
        n = n + 1
      end
    end
    if n > 0 then
      table.insert(from, machine)
      table.insert(from, n)
    end
    redis.call('DEL', set)
    redis.call('ZREM', KEYS[1], machine)
    redis.call('HDEL', KEYS[3], machine)
  end
end
if #adopted > 0 then redis.call('HINCRBY', KEYS[3], me, #adopted) end
local busy = 0
for _, machine in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  if machine ~= me then busy = busy + tonumber(redis.call('HGET', KEYS[3], machine) or '0') end
end
return {adopted, from, busy}
"""
)

# KEYS: claims, final, held; ARGV: me, then (id, status) pairs
_FINAL: Final = """
local me = ARGV[1]
local refused = {}
for i = 2, #ARGV, 2 do
  local id, status = ARGV[i], ARGV[i + 1]
  local owner = redis.call('HGET', KEYS[1], id)
  if owner and owner ~= me then
    table.insert(refused, id)
  else
    redis.call('HSET', KEYS[1], id, me)
    redis.call('HSET', KEYS[2], id, status .. ' ' .. me)
    redis.call('SREM', KEYS[3], id)
  end
end
return refused
"""

# KEYS: machines, busy, held; ARGV: me
_LEAVE: Final = """
if redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], 0)
end
return 1
"""


class SharedError(Exception):
    """Redis cannot be used for the batch (unreachable, refused): said before anything is sent."""


def shared_batch_id(backend: str, rows: Sequence[PromptRow]) -> str:
    """The batch id every machine computes from the same file: 12 hex digits of a SHA-256 of
    the backend and of each row's key (its request's hash and occurrence, or its own id)."""
    digest = hashlib.sha256(f"kling-async shared batch 1\n{backend}\n".encode())
    for row in rows:
        digest.update(row.key.encode() + b"\n")
    return digest.hexdigest()[:12]


def machine_name(token: str) -> str:
    """``<host>-<token>``: the host name (letters, digits, ``.-_`` only, at most 40) and the
    journal's random token, so two out dirs on one host are two machines."""
    host = "".join(c if c.isalnum() or c in ".-_" else "-" for c in socket.gethostname())
    return f"{host.strip('-.')[:40] or 'host'}-{token}"


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def _connect(url: str, shown: str, patience: float = 10.0) -> Any:
    """A connection that has answered a PING (Redis may be starting: tried for ``patience``
    seconds); :class:`SharedError` if it never does."""
    redis = aioredis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0
    )
    deadline = time.monotonic() + patience
    while True:
        try:
            await redis.ping()
        except RedisError as exc:
            if time.monotonic() > deadline:
                await redis.aclose()
                raise SharedError(
                    f"Redis at {shown} is unreachable or refuses us ({_why(exc)}); start it, or "
                    "check --redis (or KLING_REDIS_URL); nothing was sent"
                ) from None
            await anyio.sleep(0.25)
        else:
            return redis


async def check_reachable(url: str) -> None:
    """Redis answers (before the out dir's journal is touched); :class:`SharedError` if not."""
    redis = await _connect(url, RedisAccount(url).url)
    await redis.aclose()


@attrs.frozen
class Claimed:
    """What a claim found: how many candidates it looked at (the first ones), the rows taken
    now (``fresh``: nobody had claimed them, so nobody ever sent them), the rows this machine
    held already, and the others' (row id -> machine)."""

    examined: int
    fresh: tuple[str, ...]
    mine: tuple[str, ...]
    taken: Mapping[str, str]


@attrs.frozen
class Look:
    """The rows taken over from machines that died or left (``adopted``; ``from_machines``:
    machine -> rows), and how many rows the other live machines still work on."""

    adopted: tuple[str, ...]
    from_machines: Mapping[str, int]
    busy_elsewhere: int


@attrs.frozen
class Owner:
    """Who holds a row in the batch (None: nobody claimed it), and how it ended if it did
    (``done``, ``failed``, ``rejected``), by which machine."""

    machine: str | None = None
    final: str | None = None
    final_by: str | None = None


class _Account:
    """The run's :class:`RedisAccount`, remembering the fingerprint the client binds with:
    the batch's keys sit under the account's own prefix."""

    def __init__(self, inner: RedisAccount) -> None:
        self.inner = inner
        self.fingerprint: str | None = None

    def bind(self, settings: ka.AccountSettings) -> ka.AccountBinding:
        self.fingerprint = settings.fingerprint
        return self.inner.bind(settings)


class SharedBatch:
    """The batch's state in Redis, for one machine (see the module docstring). Every method
    may raise :class:`redis.exceptions.RedisError`; the runner keeps going through an outage."""

    def __init__(
        self,
        account: RedisAccount,
        url: str,
        *,
        fingerprint: str,
        batch_id: str,
        machine: str,
        rows: int,
        expect: bool,
    ) -> None:
        self.account = account
        self._url = url
        self.batch_id = batch_id
        self.machine = machine
        self.lease = account.lease_ttl
        self._fingerprint = fingerprint
        self._rows = rows
        #: The batch's state should be in Redis already (this journal ran it before): if it is
        #: not, Redis lost it, and what nobody claims may have been sent all the same.
        self._expect = expect
        #: Claims no longer prove a row was never sent (Redis lost the batch's state): every
        #: row is looked up before it is created.
        self.lookup_first = False
        self._registered = False
        base = f"{account.prefix(fingerprint)}batch:{batch_id}:"
        self._held_prefix = base + "held:"
        self._info = base + "info"
        self._claims = base + "claims"
        self._final = base + "final"
        self._machines = base + "machines"
        self._busy = base + "busy"
        self._held = self._held_prefix + machine
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}

    @property
    def url(self) -> str:
        """The Redis URL without its password."""
        return self.account.url

    async def __aenter__(self) -> SharedBatch:
        self._redis = await _connect(self._url, self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            with anyio.move_on_after(2.0, shield=True):
                await redis.aclose()

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._redis.register_script(source)
        return script

    # --- liveness -------------------------------------------------------------------------

    async def heartbeat(self, busy: int) -> tuple[bool, bool]:
        """Say this machine lives (and how many rows it works on). Returns (evicted, lost):
        whether it was taken for dead meanwhile (its rows moved to another machine; it is
        registered again by the next heartbeat), and whether Redis lost the batch's state
        (then, as for every machine once one has seen that, rows are looked up before they
        are created: a claim no longer proves a row was never sent)."""
        kind, lost, lookup = await self._script(_HEARTBEAT)(
            keys=[
                self._info,
                self._machines,
                self._busy,
                self._claims,
                self._final,
                self._held,
            ],
            args=[
                self.machine,
                max(100, int(self.lease * 500)),
                busy,
                int(self._registered),
                self._rows,
                KEEP_SECONDS,
                int(self._expect),
            ],
        )
        self._expect = True
        evicted = kind == "evicted"
        self._registered = not evicted
        if lost or str(lookup) == "1":
            self.lookup_first = True
        return evicted, bool(lost)

    async def lost(self) -> None:
        """Redis lost the batch's state (this machine's rows were not claimed any more): from
        now on every machine looks every row up before it creates it."""
        self.lookup_first = True
        await self._redis.hset(self._info, "lookup", 1)

    @property
    def registered(self) -> bool:
        """A heartbeat has said this machine lives (since it was last taken for dead)."""
        return self._registered

    async def leave(self) -> None:
        """This machine stops: the rows it holds unfinished go to a live machine at once."""
        await self._script(_LEAVE)(
            keys=[self._machines, self._busy, self._held], args=[self.machine]
        )

    # --- rows -----------------------------------------------------------------------------

    async def claim(self, ids: Sequence[str], want: int) -> Claimed:
        """Claim up to ``want`` of ``ids`` (looked at in order), atomically."""
        examined, fresh, mine, taken = await self._script(_CLAIM)(
            keys=[self._claims, self._held, self._final, self._busy],
            args=[self.machine, want, *ids],
        )
        pairs = list(taken)
        return Claimed(
            int(examined),
            tuple(fresh),
            tuple(mine),
            dict(zip(pairs[::2], pairs[1::2], strict=True)),
        )

    async def look(self) -> Look:
        """Take over the rows of machines silent for half a lease (or gone), and count the
        rows the other live machines still work on."""
        adopted, machines, busy = await self._script(_LOOK)(
            keys=[self._machines, self._claims, self._busy],
            args=[self.machine, self._held_prefix],
        )
        pairs = list(machines)
        return Look(
            tuple(adopted),
            {str(m): int(n) for m, n in zip(pairs[::2], pairs[1::2], strict=True)},
            int(busy),
        )

    async def finals(self, ended: Mapping[str, str]) -> list[str]:
        """Say how rows ended (row id -> ``done``, ``failed`` or ``rejected``); returns the
        rows another machine holds now (left to it)."""
        refused: list[str] = []
        items = list(ended.items())
        for start in range(0, len(items), _CHUNK):
            args: list[str] = [self.machine]
            for job_id, status in items[start : start + _CHUNK]:
                args += [job_id, status]
            refused += await self._script(_FINAL)(
                keys=[self._claims, self._final, self._held], args=args
            )
        return refused

    async def owners(self, ids: Sequence[str]) -> dict[str, Owner]:
        """Who holds each row and how it ended, as Redis says now."""
        found: dict[str, Owner] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start : start + _CHUNK])
            claims = await self._redis.hmget(self._claims, chunk)
            finals = await self._redis.hmget(self._final, chunk)
            for job_id, machine, final in zip(chunk, claims, finals, strict=True):
                status, _, by = (final or "").partition(" ")
                found[job_id] = Owner(machine, status or None, by or None)
        return found

    async def release_ended(self, ids: Sequence[str]) -> list[str]:
        """Let this machine's client send again jobs that ended with no task under a client
        that is gone (see :meth:`RedisAccount.release_ended`)."""
        return await self.account.release_ended(self._fingerprint, ids)


@asynccontextmanager
async def shared_client(
    settings: BatchSettings,
    *,
    batch_id: str,
    machine: str,
    rows: int,
    expect: bool,
) -> AsyncIterator[tuple[ka.KlingClient, SharedBatch]]:
    """The run's client, its jobs kept in Redis under the name of this machine (a rerun takes
    its own unfinished jobs back at once), and the batch's shared state. On the way out, after
    the client has written its last changes, the machine says it leaves."""
    assert settings.redis_url is not None
    account = _Account(
        RedisAccount(settings.redis_url, worker=machine, lease_ttl=settings.redis_lease)
    )
    client = ka.KlingClient(
        **client_arguments(settings, settings.api_key, settings.base_url), account=account
    )
    assert account.fingerprint is not None  # bound when the client was made (no IO)
    share = SharedBatch(
        account.inner,
        settings.redis_url,
        fingerprint=account.fingerprint,
        batch_id=batch_id,
        machine=machine,
        rows=rows,
        expect=expect,
    )
    async with share:
        try:
            async with client as kling:
                if settings.forget_durations:
                    await kling.forget_durations()
                yield kling, share
        finally:
            # Failing that, its heartbeat stops: it is taken for dead after half a lease.
            with anyio.move_on_after(3.0, shield=True), contextlib.suppress(RedisError):
                await share.leave()
