"""``RedisAccount``: one Kling account shared by many clients, processes and machines.

::

    from kling_async.redis import RedisAccount

    account = RedisAccount("redis://redis.internal:6379/0")
    async with ka.KlingClient(api_key=..., account=account) as kling:
        ...   # slots, request budget, durations, jobs and events shared with every client

Kling counts parallel tasks per account across all its keys, so clients that each learn the
limit alone overshoot it together. Here the account's state lives in Redis, changed only by
Lua scripts (each one atomic), and every client of the account sees it:

- **slots**: a sorted set of per-job leases scored by their expiry, renewed by the client
  that follows the job and released when it ends; the limit learned from 1303 answers (and
  the probing above it) is one record, so a 1303 met by one client lowers it for all;
- **request rate**: one GCRA budget (each request books the next free instant);
- **durations**: every client's completions go to a stream every client learns from;
- **jobs**: each job's record under its own key, its owner in a hash; every change goes to a
  stream that the other clients replay into replicas, so ``kling.job(id)``, ``events()``
  and the FastAPI router on any client see every job, and a callback that lands on any
  client reaches the job's owner;
- **liveness**: each client heartbeats; the unfinished jobs of a client silent for half a
  lease are adopted by a live one (looked up, followed to their end, never created twice),
  and their leases move with them, so no slot is held past a lease's expiry;
- **a stop**: an account-fatal answer (1101, 1102, ...) seen by one client stops submission
  in every one (a signal, and a key the slot script checks, for ``stop_ttl`` seconds).

Redis unreachable: submission waits (no create goes out without its "about to send" mark in
Redis), polls go on within a local share of the request budget, what is known stays in memory,
the log says so once, and everything is written again when Redis is back, also after a
restart that lost the data. What is stored, under which keys and for how long:
https://kling-async.github.io/kling-async/scaling/ (``docs/scaling.md``). No credential is
ever written; the account is named by a fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import AuthorizationError as RedisAuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

import kling_async as ka

__all__ = ["RedisAccount"]

log = logging.getLogger("kling_async")

#: Every state change of every job, replayed by the other clients (entries kept, about).
DEFAULT_CHANGES_KEPT: Final = 10_000
#: Completions kept for the duration statistics (read back by a client when it starts).
DURATIONS_KEPT: Final = 5_000

_NOW_MS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: slots, slot_owner, inflight, learn, fatal, owner, workers
# ARGV: job, me, lease_ms, ceiling (0: unknown), creates in flight while the limit is unknown
_ACQUIRE: Final = (
    _NOW_MS
    + """
local fatal = redis.call('GET', KEYS[5])
if fatal then return {'fatal', fatal} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
-- The job's owner decides, not the slot's: a worker taken for dead that does not know it
-- yet must not lease a slot for a job another (registered) worker adopted, or the slot
-- owner it writes makes the adopter give the job up too, and nobody follows it.
local owner = redis.call('HGET', KEYS[6], ARGV[1])
if owner and owner ~= ARGV[2] and redis.call('ZSCORE', KEYS[7], owner) then
  return {'taken', owner}
end
-- Two clients given one new job id: the one whose record lands first owns it; until then
-- the other waits for the slot the first holds (giving up its job on the slot alone could
-- make both give it up, each for the other's reason).
local holder = redis.call('HGET', KEYS[2], ARGV[1])
if holder and holder ~= ARGV[2] and redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {'wait', 0, redis.call('ZCARD', KEYS[1]), 0}
end
local ceiling = tonumber(ARGV[4])
local limit = tonumber(redis.call('HGET', KEYS[4], 'limit') or '0')
if ceiling > 0 and (limit == 0 or limit > ceiling) then limit = ceiling end
local active = redis.call('ZCARD', KEYS[1])
local nb = tonumber(redis.call('HGET', KEYS[4], 'not_before') or '0')
if nb > now then return {'wait', nb - now, active, limit} end
if limit > 0 and active >= limit then return {'wait', 0, active, limit} end
-- While the limit is unknown (no 1303 yet, no ceiling given), the account has as many
-- creates in flight as one client would: every one past the limit costs a 1303, and many
-- workers' creates crossing it at once would cost one each.
if limit == 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
  return {'wait', 0, active, limit}
end
local expiry = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
active = active + 1
local peak = tonumber(redis.call('HGET', KEYS[4], 'peak') or '0')
if active > peak then redis.call('HSET', KEYS[4], 'peak', active); peak = active end
return {'ok', peak, active, limit}
"""
)

# KEYS: slots, slot_owner, learn; ARGV: job, me, lease_ms
_HOLD: Final = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local active = redis.call('ZCARD', KEYS[1])
local peak = tonumber(redis.call('HGET', KEYS[3], 'peak') or '0')
if active > peak then redis.call('HSET', KEYS[3], 'peak', active); peak = active end
return {peak, active}
"""
)

# KEYS: slots, slot_owner, inflight; ARGV: job, me, channel, message
_RELEASE: Final = """
local owner = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if owner and owner ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# The limit learned from 1303 answers, as AdaptiveLimit learns it, for every client at once.
# KEYS: slots, slot_owner, inflight, learn
# ARGV: job, me, outcome, ceiling (0: unknown), probe_period_ms, first_probe_after,
#       idle_base_ms, idle_cap_ms, jitter (0.5..1), channel, message
_ANSWERED: Final = (
    _NOW_MS
    + """
local job, me, outcome = ARGV[1], ARGV[2], ARGV[3]
local ceiling = tonumber(ARGV[4])
if ceiling == 0 then ceiling = 1e15 end
local function num(field, default)
  return tonumber(redis.call('HGET', KEYS[4], field) or default)
end
local limit = num('limit', '0')
if limit == 0 or limit > ceiling then limit = ceiling end
redis.call('ZREM', KEYS[3], job)
local owner = redis.call('HGET', KEYS[2], job)
local mine = (not owner) or owner == me
if outcome == 'created' then
  redis.call('HSET', KEYS[4], 'idle_refusals', 0)
  local active = redis.call('ZCARD', KEYS[1])
  local probe_from = redis.call('HGET', KEYS[4], 'probe_from')
  if probe_from then
    if active - redis.call('ZCARD', KEYS[3]) <= tonumber(probe_from) then return {limit} end
    redis.call('HDEL', KEYS[4], 'probe_from')
    redis.call('HSET', KEYS[4], 'climbing', 1)
  end
  if active < limit or limit >= ceiling then return {limit} end
  if redis.call('HEXISTS', KEYS[4], 'last_probe') == 0 then
    redis.call('HSET', KEYS[4], 'last_probe', now)
  end
  local successes = num('successes', '0') + 1
  local wanted = num('probe_after', ARGV[6])
  if num('climbing', '0') == 1 then wanted = 1 end
  if successes >= wanted or now - num('last_probe', '0') >= tonumber(ARGV[5]) then
    limit = math.min(ceiling, limit + 1)
    redis.call('HSET', KEYS[4], 'successes', 0, 'last_probe', now, 'probe_from', limit - 1,
      'limit', limit)
    redis.call('PUBLISH', ARGV[10], ARGV[11])
  else
    redis.call('HSET', KEYS[4], 'successes', successes)
  end
  return {limit}
end
if outcome == 'refused' then
  if mine then
    redis.call('ZREM', KEYS[1], job)
    redis.call('HDEL', KEYS[2], job)
  end
  redis.call('HINCRBY', KEYS[4], 'refused', 1)
  if redis.call('HEXISTS', KEYS[4], 'probe_from') == 1 then
    redis.call('HSET', KEYS[4], 'probe_after', math.min(num('probe_after', ARGV[6]) * 2, 256))
    redis.call('HDEL', KEYS[4], 'probe_from')
  end
  local active = redis.call('ZCARD', KEYS[1])
  -- The tasks known to exist, not the creates still in flight: with several workers many
  -- creates cross the limit at once while it is unknown, and counting them would leave the
  -- limit above the account's, one 1303 per create in flight. One set too low is climbed
  -- back by the probes, a slot per finished task.
  local existing = active - redis.call('ZCARD', KEYS[3])
  limit = math.max(1, math.min(limit, existing))
  redis.call('HSET', KEYS[4], 'climbing', 0, 'successes', 0, 'limit', limit)
  if active == 0 then
    local idle = redis.call('HINCRBY', KEYS[4], 'idle_refusals', 1)
    local delay = math.min(tonumber(ARGV[8]), tonumber(ARGV[7]) * 2 ^ (idle - 1))
    redis.call('HSET', KEYS[4], 'not_before', now + math.floor(delay * tonumber(ARGV[9])))
  end
  return {limit}
end
if outcome == 'failed' and mine then
  redis.call('ZREM', KEYS[1], job)
  redis.call('HDEL', KEYS[2], job)
  redis.call('PUBLISH', ARGV[10], ARGV[11])
end
return {limit}
"""
)

# GCRA: each request books the next free instant (microseconds); the wait is returned.
# KEYS: rate; ARGV: interval_us, burst
_RATE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(tat, now - (tonumber(ARGV[2]) - 1) * interval)
local ttl = math.ceil((slot + interval - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', slot + interval), 'PX', ttl)
return string.format('%.0f', slot - now)
"""

# KEYS: workers, slots, slot_owner, epoch
# ARGV: me, dead_after_ms, lease_ms, epoch, registered (0/1), a fresh epoch, held job ids...
_HEARTBEAT: Final = (
    _NOW_MS
    + """
local epoch = redis.call('GET', KEYS[4])
if not epoch then
  -- A fresh epoch, not ours: every client took the first one's epoch when it started, so
  -- writing ours back would hide the loss from the others (they would take themselves
  -- for evicted, and with the owners lost, give up all their jobs).
  redis.call('SET', KEYS[4], ARGV[6])
  return {'lost', ARGV[6]}
end
if epoch ~= ARGV[4] then return {'epoch', epoch} end
if ARGV[5] == '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'evicted'} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local lost = {}
for i = 7, #ARGV do
  local job = ARGV[i]
  local owner = redis.call('HGET', KEYS[3], job)
  if owner and owner ~= ARGV[1] then
    table.insert(lost, job)
  else
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), job)
    redis.call('HSET', KEYS[3], job, ARGV[1])
  end
end
return {'ok', redis.call('ZCOUNT', KEYS[1], now, '+inf'), lost}
"""
)

# KEYS: workers, owner, slots, slot_owner; ARGV: me, prefix, lease_ms
_ADOPT: Final = (
    _NOW_MS
    + """
local adopted = {}
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if worker ~= ARGV[1] then
    local set = ARGV[2] .. 'owned:' .. worker
    for _, id in ipairs(redis.call('SMEMBERS', set)) do
      local owner = redis.call('HGET', KEYS[2], id)
      if (not owner) or owner == worker then  -- not one another client took over since
        redis.call('HSET', KEYS[2], id, ARGV[1])
        redis.call('SADD', ARGV[2] .. 'owned:' .. ARGV[1], id)
        if redis.call('ZSCORE', KEYS[3], id) then
          redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), id)
          redis.call('HSET', KEYS[4], id, ARGV[1])
        end
        table.insert(adopted, id)
      end
    end
    redis.call('DEL', set)
    redis.call('ZREM', KEYS[1], worker)
  end
end
return adopted
"""
)

# A job is written by its owner only. An ended job whose owner is gone (it ended with no
# task: a stop, an unreachable host) is never adopted, so a client that submits its id again
# takes it over (its job looks the task up first where the record says a create went out).
# KEYS: index, owner, owned set of me, changes, workers, then one key per record
# ARGV: me, finished_ttl_s, changes_kept, then (id, json, finished, created_at) per record
_SAVE: Final = (
    _NOW_MS
    + """
local me = ARGV[1]
local prefix = KEYS[3]:sub(1, #KEYS[3] - #('owned:' .. me))
local skipped = {}
local n = (#ARGV - 3) / 4
for i = 1, n do
  local at = 3 + (i - 1) * 4
  local id, body, finished, created = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local key = KEYS[5 + i]
  local owner = redis.call('HGET', KEYS[2], id)
  local taken = owner and owner ~= me
  if taken then
    local alive = tonumber(redis.call('ZSCORE', KEYS[5], owner) or '0')
    local theirs = prefix .. 'owned:' .. owner  -- their unfinished jobs: adoption's to move
    if alive <= now and redis.call('SISMEMBER', theirs, id) == 0 then taken = false end
  end
  if taken then
    table.insert(skipped, id)
  else
    redis.call('SET', key, body)
    redis.call('ZADD', KEYS[1], 'NX', created, id)
    redis.call('HSET', KEYS[2], id, me)
    if finished == '1' then
      redis.call('EXPIRE', key, tonumber(ARGV[2]))
      redis.call('SREM', KEYS[3], id)
    else
      redis.call('SADD', KEYS[3], id)
    end
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'w', me, 'j', body)
  end
end
return skipped
"""
)


def _redacted(url: str) -> str:
    """The Redis URL without its password (for reprs and log lines)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number: nothing of it is shown
        return "<a URL that does not parse>"
    if parts.scheme == "unix":
        # A socket's path; userinfo (``unix://:pw@/path``) is cut off, never shown.
        return f"unix://{parts.path.rsplit('@', 1)[-1]}"
    if not parts.hostname:
        # Without a host the rest (credentials included) would be read as a path: not shown.
        return f"{parts.scheme or '?'}://?"
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class RedisAccount:
    """One Kling account's shared state in Redis (see the module docstring).

    ``url`` is a ``redis://`` (or ``rediss://``, ``unix://``) URL; its password never appears
    in a repr or a log line. ``name`` names the account in the keys (default: a fingerprint of
    the base URL and the key, so clients with the same credentials share one account; name
    it when several keys belong to one account). ``namespace`` prefixes every key.
    ``worker`` names this process (default: host, pid and a random suffix): a worker
    restarted under the same name takes its own unfinished jobs back at once.

    ``lease_ttl`` (seconds) is how long a slot lease lives unrenewed: a worker heartbeats
    every sixth of it and is taken for dead after half of it, when its jobs are adopted.
    ``finished_ttl`` is how long an ended job's record is kept (7 days), ``stop_ttl`` how
    long an account-fatal stop holds for clients that start later (10 minutes), and
    ``changes_kept`` how many job changes the stream keeps for the replicas (about).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        name: str | None = None,
        namespace: str = "kling",
        worker: str | None = None,
        lease_ttl: float = 30.0,
        finished_ttl: float = 7 * 86400,
        stop_ttl: float = 600.0,
        changes_kept: int = DEFAULT_CHANGES_KEPT,
    ) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if (
            parts is None
            or parts.scheme not in ("redis", "rediss", "unix")
            or not (parts.path if parts.scheme == "unix" else parts.hostname)
        ):
            raise ka.ValidationError(
                "url",
                _redacted(str(url)),
                "must be a redis:// or rediss:// URL with a host, or a unix:// URL with a path",
            )
        for field, value in (("name", name), ("namespace", namespace), ("worker", worker)):
            if value is not None and not (
                isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable()
            ):
                raise ka.ValidationError(field, value, "must be 1 to 128 printable characters")
        for field, seconds in (
            ("lease_ttl", lease_ttl),
            ("finished_ttl", finished_ttl),
            ("stop_ttl", stop_ttl),
        ):
            if not isinstance(seconds, int | float) or not 0.3 <= seconds <= 1e8:
                raise ka.ValidationError(field, seconds, "must be a number of seconds >= 0.3")
        if not isinstance(changes_kept, int) or changes_kept < 100:
            raise ka.ValidationError("changes_kept", changes_kept, "must be a whole number >= 100")
        self._url = url
        self.name = name
        self.namespace = namespace
        self.worker = worker
        self.lease_ttl = float(lease_ttl)
        self.finished_ttl = float(finished_ttl)
        self.stop_ttl = float(stop_ttl)
        self.changes_kept = changes_kept
        #: The fingerprint of the last client bound (for :meth:`forget_durations`).
        self._fingerprint: str | None = None

    @property
    def url(self) -> str:
        """The Redis URL, without its password."""
        return _redacted(self._url)

    def __repr__(self) -> str:
        return f"RedisAccount({self.url!r}, namespace={self.namespace!r})"

    def prefix(self, fingerprint: str) -> str:
        """The prefix of every key of the account (one hash tag, so a cluster keeps them on
        one node)."""
        return f"{self.namespace}:{{{self.name or fingerprint}}}:"

    def bind(self, settings: ka.AccountSettings) -> _Binding:
        worker = self.worker or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._fingerprint = settings.fingerprint
        return _Binding(self, self._url, self.prefix(settings.fingerprint), worker, settings)

    async def forget_durations(self, fingerprint: str | None = None) -> None:
        """Delete what the account learned of every class's durations (the stream of
        completions a client starts from), so the next client starts each class from its
        poll policy: for when tasks got faster or slower for good. The account is the one
        ``fingerprint`` names (as clients bind with it, :class:`kling_async.AccountSettings`),
        else the one this object's ``name`` names, else that of the last client made with
        this object. Running clients keep their models; ``await kling.forget_durations()``
        resets that client too."""
        fingerprint = fingerprint or self._fingerprint
        if fingerprint is None and self.name is None:
            raise ka.UsageError(
                "forget_durations() needs the account: give RedisAccount a name=, pass the "
                "fingerprint, or call it after a KlingClient was made with this account"
            )
        keys = _Keys(self.prefix(fingerprint or ""), "")
        connection = aioredis.Redis.from_url(
            self._url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        try:
            await connection.delete(keys.durations)
        finally:
            await connection.aclose()

    async def release_ended(self, fingerprint: str, job_ids: Sequence[str]) -> list[str]:
        """Let any client of the account send again jobs that ended with no task (an
        unreachable host, a stop) under a worker that is gone: such a job is never adopted
        (it has ended), and its record keeps the gone worker as owner, so another client's
        new job of that id would be refused the record and wait for it forever. Returns the
        ids let go; a job whose owner lives, or that has not ended, is left alone.
        ``fingerprint`` is the one the clients bind with (:class:`kling_async.AccountSettings`)."""
        keys = _Keys(self.prefix(fingerprint), "")
        connection = aioredis.Redis.from_url(
            self._url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        try:
            released = await connection.eval(
                _NOW_MS
                + """
local released = {}
for i = 2, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if owner and tonumber(redis.call('ZSCORE', KEYS[2], owner) or '0') <= now
      and redis.call('SISMEMBER', ARGV[1] .. 'owned:' .. owner, ARGV[i]) == 0 then
    redis.call('HDEL', KEYS[1], ARGV[i])
    table.insert(released, ARGV[i])
  end
end
return released
""",
                2,
                keys.owner,
                keys.workers,
                keys.prefix,
                *job_ids,
            )
        finally:
            await connection.aclose()
        return list(released)


class _Keys:
    def __init__(self, prefix: str, worker: str) -> None:
        self.prefix = prefix
        self.slots = prefix + "slots"
        self.slot_owner = prefix + "slot_owner"
        self.inflight = prefix + "inflight"
        self.learn = prefix + "limit"
        self.fatal = prefix + "fatal"
        self.rate = prefix + "rate"
        self.workers = prefix + "workers"
        self.epoch = prefix + "epoch"
        self.index = prefix + "jobs"
        self.owner = prefix + "owner"
        self.mine = prefix + "owned:" + worker
        self.changes = prefix + "changes"
        self.durations = prefix + "durations"
        self.signals = prefix + "signals"

    def job(self, job_id: str) -> str:
        return self.prefix + "job:" + job_id


class _Ops:
    """Writes the engine asked for without waiting (a release, a hold, a completion), made in
    order by one coroutine and kept through an outage until Redis takes them."""

    def __init__(self) -> None:
        self._queue: deque[tuple[str, Callable[[], Awaitable[object]]]] = deque()
        self._wake = anyio.Event()

    def add(self, what: str, op: Callable[[], Awaitable[object]]) -> None:
        self._queue.append((what, op))
        self._wake.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def run(self, outage: _Outage) -> None:
        while True:
            if not self._queue:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self.drain(outage)

    async def drain(self, outage: _Outage) -> None:
        while self._queue:
            what, op = self._queue[0]
            try:
                await op()
            except RedisError as exc:
                await outage.failed(f"{what} waits", exc)
                continue
            outage.ok()
            self._queue.popleft()


class _Outage:
    """Whether Redis answers: the first failure is logged once, as is the recovery."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.since: float | None = None
        self.connected_at = time.monotonic()
        self._failures = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    async def failed(self, what: str, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.error(
                "Redis at %s is unavailable (%s): submission waits, jobs stay in memory, "
                "polls go on; %s",
                self._url,
                _why(exc),
                what,
            )
        self._failures += 1
        await anyio.sleep(min(2.0, 0.05 * 2 ** min(self._failures, 6)))

    def ok(self) -> None:
        self._failures = 0
        if self.since is not None:
            log.warning(
                "Redis at %s is back after %.1f s", self._url, time.monotonic() - self.since
            )
            self.since = None
            self.connected_at = time.monotonic()


class _Slots:
    """The account's slots as leases in Redis (:class:`kling_async.SlotLimiter`)."""

    def __init__(self, binding: _Binding) -> None:
        self._b = binding
        self.held: set[str] = set()
        self.active = 0
        self.limit: float = math.inf
        self.peak_active = 0
        self.concurrency_limited = 0
        self._changed = anyio.Event()
        self._rng = random.Random()
        self._asking = anyio.Lock()
        #: The job waiting for a slot now, and those of them another client owns now (the
        #: wait ends: the submitter sees the replica).
        self.waiting: set[str] = set()
        self.gone: set[str] = set()

    def wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _seen(self, peak: int, active: int, limit: float) -> None:
        self.peak_active, self.active = int(peak), int(active)
        self.limit = math.inf if not limit or limit >= 1e15 else float(limit)

    async def acquire(self, job_id: str) -> None:
        # One create worker of this client asks the account at a time: a release wakes one
        # script call per client, not one per create worker (which all but one would lose).
        async with self._asking:
            self.waiting.add(job_id)
            try:
                await self._acquire(job_id)
            finally:
                self.waiting.discard(job_id)
                self.gone.discard(job_id)

    async def _acquire(self, job_id: str) -> None:
        b = self._b
        keys = b.keys
        ceiling = b.settings.max_active_tasks or 0
        while True:
            changed = self._changed
            if job_id in self.gone:
                return  # its owner is another client: the submitter sees the replica
            try:
                answer = await b.script(_ACQUIRE)(
                    keys=[
                        keys.slots,
                        keys.slot_owner,
                        keys.inflight,
                        keys.learn,
                        keys.fatal,
                        keys.owner,
                        keys.workers,
                    ],
                    args=[job_id, b.worker, b.lease_ms, ceiling, b.settings.max_concurrent_submits],
                )
            except RedisError as exc:
                await b.outage.failed("submission waits for it", exc)
                continue
            b.outage.ok()
            kind = answer[0]
            if kind == "ok":
                self._seen(answer[1], answer[2], float(answer[3]))
                self.held.add(job_id)
                if job_id in self.gone:
                    # Disowned while the lease was in flight (another client's record
                    # landed first): the job is that client's, and it waits for this very
                    # slot. Kept, the lease would be renewed for a job no one here follows.
                    self.release(job_id)
                return
            if kind == "fatal":
                b.told_stop(answer[1])
                return  # the submitter sees the stop and ends the job
            if kind == "taken":
                b.taken(job_id)
                return
            self.active, wait = int(answer[2]), float(answer[1]) / 1000
            self.limit = math.inf if not answer[3] else float(answer[3])
            # A release anywhere on the account wakes this at once; the lease that expires
            # or the back-off that ends is looked at again within a second.
            with anyio.move_on_after(max(0.01, min(1.0, wait or 1.0))):
                await changed.wait()

    def hold(self, job_id: str) -> None:
        b = self._b
        self.held.add(job_id)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)

        async def op() -> None:
            peak, active = await b.script(_HOLD)(
                keys=[b.keys.slots, b.keys.slot_owner, b.keys.learn],
                args=[job_id, b.worker, b.lease_ms],
            )
            self.peak_active, self.active = int(peak), int(active)

        b.ops.add("a slot's lease", op)

    def answered(self, job_id: str, outcome: ka.CreateOutcome) -> None:
        # "landed": the slot stays held and nothing is learned; the create is no longer in
        # flight, which the script records.
        b = self._b
        if outcome in ("refused", "failed"):
            self.held.discard(job_id)
        if outcome == "refused":
            self.concurrency_limited += 1
        retry = b.settings.retry
        jitter = self._rng.uniform(0.5, 1.0)

        async def op() -> None:
            (limit,) = await b.script(_ANSWERED)(
                keys=[b.keys.slots, b.keys.slot_owner, b.keys.inflight, b.keys.learn],
                args=[
                    job_id,
                    b.worker,
                    outcome,
                    b.settings.max_active_tasks or 0,
                    int(20 * b.settings.poll.max_interval * 1000),
                    4,
                    int(retry.initial * 1000),
                    int(retry.maximum * 1000),
                    jitter,
                    b.keys.signals,
                    b.signal("released"),
                ],
            )
            self.limit = math.inf if float(limit) >= 1e15 else float(limit)

        b.ops.add("a create's answer", op)

    def release(self, job_id: str) -> None:
        b = self._b
        if job_id not in self.held:
            return
        self.held.discard(job_id)
        self.active = max(0, self.active - 1)

        async def op() -> None:
            await b.script(_RELEASE)(
                keys=[b.keys.slots, b.keys.slot_owner, b.keys.inflight],
                args=[job_id, b.worker, b.keys.signals, b.signal("released")],
            )

        b.ops.add("a slot's release", op)


class _Rate:
    """One request budget for the account (:class:`kling_async.RequestLimiter`); while
    Redis is down, a local share of it (the rate over the clients last seen alive)."""

    def __init__(self, binding: _Binding) -> None:
        self._b = binding
        rate = binding.settings.max_requests_per_second
        self._interval_us = None if rate is None else max(1, round(1e6 / rate))
        self._burst = max(1, math.ceil(rate or 1))
        self._paused_until = 0.0
        self._local: ka.RequestBudget | None = None
        self._local_share = 0

    def pause(self, seconds: float, *, tell: bool = True) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        if tell:
            b = self._b
            b.ops.add("a pause", lambda: b.publish("pause", seconds=seconds))

    async def acquire(self) -> None:
        while (paused := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await anyio.sleep(paused)
        if self._interval_us is None:
            return
        b = self._b
        if not b.outage.down:
            try:
                wait_us = await b.script(_RATE)(
                    keys=[b.keys.rate], args=[self._interval_us, self._burst]
                )
            except RedisError as exc:
                log.warning("the shared request budget is unavailable (%s)", _why(exc))
            else:
                wait = float(wait_us) / 1e6
                if wait > 0:
                    await anyio.sleep(wait)
                return
        await self._fallback().acquire()

    def _fallback(self) -> ka.RequestBudget:
        share = max(1, self._b.live_workers)
        if self._local is None or self._local_share != share:
            rate = self._b.settings.max_requests_per_second
            assert rate is not None
            self._local = ka.RequestBudget(rate / share)
            self._local_share = share
        return self._local


class _Durations:
    """Local models fed by every client's completions (:class:`kling_async.DurationStats`)."""

    def __init__(self, binding: _Binding) -> None:
        self._b = binding
        self._local = ka.LearnedDurations(binding.settings.poll)
        #: Each completion carries "<this client>:<n>": an add the client cancelled while it
        #: closed may have landed and is made again, and readers count such a repeat once.
        self._me = secrets.token_hex(6)
        self._sent = 0
        self._seen: dict[str, int] = {}

    def model(self, key: tuple[str, str, str]) -> Any:
        return self._local.model(key)

    def _accept(
        self, key: Sequence[str], seconds: float, mark: str | None
    ) -> tuple[str, str, str] | None:
        """The class of a completion read from the stream, or None for a repeat of an add
        seen already, a malformed mark or an entry that is no completion (stored data is
        outside input)."""
        if mark is not None:
            client, _, n = mark.rpartition(":")
            if not n.isdigit() or int(n) <= self._seen.get(client, -1):
                return None  # a repeat of an add seen already (or a malformed mark)
            self._seen[client] = int(n)
        if not (isinstance(key, list) and len(key) == 3 and 0 < seconds < 1e7):
            return None
        return (str(key[0]), str(key[1]), str(key[2]))

    def learn(self, key: Sequence[str], seconds: float, mark: str | None = None) -> None:
        found = self._accept(key, seconds, mark)
        if found is not None:
            self._local.observe(found, seconds)

    def load(self, entries: Iterable[Mapping[str, str]]) -> None:
        """What a client starts from: the completions the stream kept (oldest first), summed
        per class and loaded as a job store's summaries are (``LearnedDurations.load``), so a
        class weighs as much whether a journal or an account kept it, and a class the stream
        holds thousands of can still move within one run."""
        sums: dict[tuple[str, str, str], list[float]] = {}
        for fields in entries:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                seconds = float(fields["s"])
                found = self._accept(json.loads(fields["k"]), seconds, fields.get("n"))
                if found is not None:
                    log_s = math.log(seconds)
                    acc = sums.setdefault(found, [0.0, 0.0, 0.0])
                    acc[0] += 1
                    acc[1] += log_s
                    acc[2] += log_s * log_s
        summaries: dict[tuple[str, str, str], ka.DurationSummary] = {}
        for key, (n, logs, squares) in sums.items():
            mean = logs / n
            summaries[key] = ka.DurationSummary(int(n), mean, max(0.0, squares / n - mean**2))
        if summaries:
            self._local.load(summaries)

    async def forget_durations(self) -> None:
        """Forget every class, here and in the account (the stream every client learns from,
        and a new client loads); other running clients keep their models until they restart."""
        self._local.reset()
        await self._b.redis.delete(self._b.keys.durations)

    def observe(self, key: tuple[str, str, str], seconds: float) -> None:
        self._local.observe(key, seconds)
        b = self._b
        mark = f"{self._me}:{self._sent}"
        self._sent += 1

        async def op() -> None:
            await b.redis.xadd(
                b.keys.durations,
                {"w": b.worker, "k": json.dumps(list(key)), "s": repr(float(seconds)), "n": mark},
                maxlen=DURATIONS_KEPT,
                approximate=True,
            )

        b.ops.add("a completion", op)


class _Store:
    """The jobs in Redis (:class:`kling_async.JobStore`): each record under its own key,
    written only by its owner; ``load`` gives this worker's own (a restart under the same
    ``worker`` name), the binding replicates the others'."""

    def __init__(self, binding: _Binding) -> None:
        self._b = binding
        #: Each job's record as last written, but for its ``updated_at``: a poll that saw
        #: nothing new is not written, nor replayed by every other client. Compared as
        #: frozen attrs values (no encoding on the path of every unchanged poll); they share
        #: the request and task objects the jobs hold already.
        self._written: dict[str, ka.JobRecord] = {}

    def forget(self) -> None:
        """Redis lost what was written: the next save writes every record again."""
        self._written.clear()

    async def save(self, records: Iterable[ka.JobRecord]) -> None:
        b = self._b
        keys = [b.keys.index, b.keys.owner, b.keys.mine, b.keys.changes, b.keys.workers]
        args: list[Any] = [b.worker, int(b.account.finished_ttl), b.account.changes_kept]
        fresh: dict[str, ka.JobRecord] = {}
        for record in records:
            digest = attrs.evolve(record, updated_at=0.0)
            if self._written.get(record.id) == digest:
                continue
            fresh[record.id] = digest
            keys.append(b.keys.job(record.id))
            args += [
                record.id,
                json.dumps(record.to_dict(), separators=(",", ":")),
                int(record.finished),
                record.created_at,
            ]
        if not fresh:
            return
        while True:
            try:
                skipped = await b.script(_SAVE)(keys=keys, args=args)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # Unreachable (restarting, loading): wait for it, as every other write does.
                # Raised, it would count against these records in the engine's StoreWriter,
                # which drops a record refused a few times (it cannot tell a store that is
                # down from a record it cannot take): a job's last change, its end, would
                # then never reach Redis, and the other clients' replicas never end.
                await b.outage.failed("the jobs are written when it is back", exc)
                continue
            except RedisError as exc:
                raise ka.JobStoreError(
                    f"Redis at {b.account.url} did not take the jobs ({_why(exc)})"
                ) from None
            b.outage.ok()
            break
        for job_id, digest in fresh.items():
            if job_id not in skipped:
                self._written[job_id] = digest
        if skipped:
            # Another client's record of these ids landed first: they are its jobs, and it
            # waits for any slot this client leased for them, so the leases go back now.
            b.disowned(skipped, release=True)

    async def load(self) -> list[ka.JobRecord]:
        return [record for record, owner in await self._b.records() if owner == self._b.worker]


class _Binding:
    """One client's binding to the account (:class:`kling_async.AccountBinding`)."""

    def __init__(
        self,
        account: RedisAccount,
        url: str,
        prefix: str,
        worker: str,
        settings: ka.AccountSettings,
    ) -> None:
        self.account = account
        self._url = url
        self.worker = worker
        self.settings = settings
        self.keys = _Keys(prefix, worker)
        self.lease_ms = max(100, int(account.lease_ttl * 1000))
        self.outage = _Outage(account.url)
        self.ops = _Ops()
        self.live_workers = 1
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._epoch = secrets.token_hex(8)
        self._registered = False
        self._member: ka.AccountMember | None = None
        self._pending_disowned: list[str] = []
        self._changes_from = "0-0"
        self._durations_from = "0-0"
        self._slots = _Slots(self)
        self._rate = _Rate(self)
        self._durations = _Durations(self)
        self._store = _Store(self)

    def __repr__(self) -> str:
        return f"<RedisAccount binding {self.account.url} worker={self.worker!r}>"

    # --- the seams ------------------------------------------------------------------------

    @property
    def slots(self) -> ka.SlotLimiter:
        return self._slots

    @property
    def requests(self) -> ka.RequestLimiter:
        return self._rate

    @property
    def durations(self) -> ka.DurationStats:
        return self._durations

    @property
    def store(self) -> ka.JobStore:
        return self._store

    @property
    def redis(self) -> Any:
        """The connection (typed loosely: redis-py's answers depend on decode_responses)."""
        assert self._redis is not None, "the binding is not open"
        return self._redis

    def script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.redis.register_script(source)
        return script

    def signal(self, kind: str, **fields: Any) -> str:
        return json.dumps({"w": self.worker, "t": kind, **fields}, separators=(",", ":"))

    async def publish(self, kind: str, **fields: Any) -> None:
        await self.redis.publish(self.keys.signals, self.signal(kind, **fields))

    # --- open and close -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._redis = aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            health_check_interval=10,
        )
        deadline = time.monotonic() + 10.0
        try:
            while True:
                try:
                    await self._redis.ping()
                    await self._redis.set(self.keys.epoch, self._epoch, nx=True)
                    self._epoch = await self._redis.get(self.keys.epoch) or self._epoch
                    break
                except (RedisAuthenticationError, RedisAuthorizationError) as exc:
                    raise ka.JobStoreError(
                        f"Redis at {self.account.url} refused this client ({_why(exc)}); "
                        "check the URL's password and the user's permissions"
                    ) from None
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise ka.JobStoreError(
                            f"Redis at {self.account.url} is unreachable ({_why(exc)}); "
                            "start it, or check the URL"
                        ) from None
                    await anyio.sleep(0.25)
                except RedisError as exc:
                    # It answered, and refused (a wrong password, no permission): waiting
                    # cannot help.
                    raise ka.JobStoreError(
                        f"Redis at {self.account.url} refused this client ({_why(exc)}); "
                        "check the URL's password and the user's permissions"
                    ) from None
        except BaseException:
            with anyio.move_on_after(2.0, shield=True):
                await self._redis.aclose()
            self._redis = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Write what is left (releases, completions), bounded, then say this worker is gone
        so a live one adopts its unfinished jobs at once."""
        redis = self._redis
        if redis is None:
            return
        with anyio.move_on_after(5.0, shield=True):
            if not self.outage.down:
                with contextlib.suppress(RedisError):
                    await self.ops.drain(self.outage)
                with contextlib.suppress(RedisError):
                    await redis.zadd(self.keys.workers, {self.worker: 0})
        if len(self.ops):
            log.error(
                "Redis at %s did not take %d last writes; leases expire on their own",
                self.account.url,
                len(self.ops),
            )
        with anyio.move_on_after(2.0, shield=True):
            await redis.aclose()
        self._redis = None

    # --- the link -------------------------------------------------------------------------

    async def serve(
        self, member: ka.AccountMember, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        self._member = member
        if self._pending_disowned:
            member.disown(self._pending_disowned)
            self._pending_disowned = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals)
            tg.start_soon(self.ops.run, self.outage)
            await self._catch_up()
            await self._heartbeat()
            task_status.started()
            tg.start_soon(self._heartbeats)
            tg.start_soon(self._reader)

    def forward(self, task: ka.Task) -> None:
        # Only the task id and the status claimed: the owner confirms it with a GET, so
        # nothing else of an untrusted body (a result URL) is ever written to Redis.
        self.ops.add(
            "a hint", lambda: self.publish("hint", task=task.task_id, status=task.status.value)
        )

    def stopped(self, error: BaseException) -> None:
        body = json.dumps(
            {
                "message": getattr(error, "message", str(error)),
                "code": getattr(error, "code", None),
                "http_status": getattr(error, "http_status", 429),
                "request_id": getattr(error, "request_id", None),
            }
        )

        async def op() -> None:
            await self.redis.set(self.keys.fatal, body, ex=max(1, int(self.account.stop_ttl)))
            await self.publish("stop", error=body)

        self.ops.add("the account's stop", op)

    def told_stop(self, body: str) -> None:
        try:
            data = json.loads(body)
            error = ka.AccountError(
                f"another client of the account was told: {data.get('message') or ''}",
                code=data.get("code"),
                http_status=int(data.get("http_status") or 429),
                request_id=data.get("request_id"),
            )
        except (ValueError, TypeError, AttributeError):
            error = ka.AccountError(
                "another client of the account met an account-fatal answer",
                code=None,
                http_status=429,
            )
        if self._member is not None:
            self._member.stop(error)

    def taken(self, job_id: str) -> None:
        self.disowned([job_id])

    def disowned(self, job_ids: Sequence[str], *, release: bool = False) -> None:
        """Another client owns these jobs now. ``release``: it has no slot for them yet and
        waits for the one this client may hold (else an adopter has taken the lease over,
        or it expires)."""
        for job_id in job_ids:
            if release:
                self._slots.release(job_id)
            else:
                self._slots.held.discard(job_id)
            if job_id in self._slots.waiting:
                self._slots.gone.add(job_id)
        self._slots.wake()
        if self._member is None:
            self._pending_disowned += list(job_ids)
        else:
            self._member.disown(job_ids)
        ids = list(job_ids)

        async def op() -> None:
            # The owner's record as it is: a replica that already ended (a job of this id
            # another client finished) ends here too, instead of waiting for a change.
            records = [record for record, _ in await self.records(ids)]
            if records and self._member is not None:
                self._member.replicate(records)

        self.ops.add("the owners' records", op)

    async def records(self, ids: Sequence[str] | None = None) -> list[tuple[ka.JobRecord, str]]:
        """Records with their owners: these ids, or every job of the account (oldest first;
        an index entry whose record expired is dropped)."""
        redis = self.redis
        if ids is None:
            ids = list(await redis.zrange(self.keys.index, 0, -1))
        found: list[tuple[ka.JobRecord, str]] = []
        gone: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            bodies = await redis.mget([self.keys.job(i) for i in chunk])
            owners = await redis.hmget(self.keys.owner, chunk)
            for job_id, body, owner in zip(chunk, bodies, owners, strict=True):
                if body is None:
                    gone.append(job_id)
                    continue
                try:
                    found.append((ka.JobRecord.from_dict(json.loads(body)), owner or ""))
                except (ValueError, TypeError, KeyError, ka.KlingError) as exc:
                    log.error("job %s in Redis is unreadable (%s); left alone", job_id, exc)  # noqa: TRY400
            await anyio.lowlevel.checkpoint()
        if gone:
            await redis.zrem(self.keys.index, *gone)
            await redis.hdel(self.keys.owner, *gone)
        return found

    async def _catch_up(self) -> None:
        """Replicate every job of the account, and learn from its recent completions."""
        redis = self.redis
        last = await redis.xrevrange(self.keys.changes, count=1)
        self._changes_from = last[0][0] if last else "0-0"
        others = [r for r, owner in await self.records() if owner != self.worker]
        assert self._member is not None
        self._member.replicate(others)
        recent = await redis.xrevrange(self.keys.durations, count=DURATIONS_KEPT)
        self._durations_from = recent[0][0] if recent else "0-0"
        self._durations.load(fields for _, fields in reversed(recent))

    def _learn(self, fields: Mapping[str, str]) -> None:
        with contextlib.suppress(KeyError, ValueError, TypeError):
            self._durations.learn(json.loads(fields["k"]), float(fields["s"]), fields.get("n"))

    async def _heartbeats(self) -> None:
        every = self.account.lease_ttl / 6
        while True:
            await anyio.sleep(every)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        """Say this worker lives, renew its leases, notice a Redis that lost its data (write
        everything again) or an eviction (give up what others adopted), and adopt the jobs of
        workers silent for half a lease."""
        dead_after = max(100, self.lease_ms // 2)
        try:
            answer = await self.script(_HEARTBEAT)(
                keys=[self.keys.workers, self.keys.slots, self.keys.slot_owner, self.keys.epoch],
                args=[
                    self.worker,
                    dead_after,
                    self.lease_ms,
                    self._epoch,
                    int(self._registered),
                    secrets.token_hex(8),
                    *sorted(self._slots.held),
                ],
            )
            # Redis answers: an outage ends here, before the adoption below looks at how
            # long it has answered (else the first heartbeat after an outage adopts every
            # worker whose registration lapsed while it was down).
            self.outage.ok()
            kind = answer[0]
            if kind in ("lost", "epoch"):
                await self._resync(answer[1])
                return
            if kind == "evicted":
                await self._evicted()
                return
            self._registered = True
            self.live_workers = int(answer[1])
            if answer[2]:
                self.disowned(answer[2])
            # Adopt only after a lease's time of answers: after an outage every worker gets
            # its chance to say it lives before any is taken for dead.
            if time.monotonic() - self.outage.connected_at >= self.account.lease_ttl / 2:
                await self._adopt()
        except RedisError as exc:
            # Back off no longer than a heartbeat's period (the outage's back-off grows to
            # 2 s): once Redis is back, this worker must say it lives within half a lease,
            # or the first worker back takes it for dead and adopts all its jobs.
            with anyio.move_on_after(self.account.lease_ttl / 6):
                await self.outage.failed("leases are renewed when it is back", exc)
            return
        self.outage.ok()

    async def _adopt(self) -> None:
        ids = await self.script(_ADOPT)(
            keys=[self.keys.workers, self.keys.owner, self.keys.slots, self.keys.slot_owner],
            args=[self.worker, self.keys.prefix, self.lease_ms],
        )
        if not ids:
            return
        records = [record for record, _ in await self.records(ids)]
        log.warning("adopted %d jobs of a worker that stopped answering", len(records))
        assert self._member is not None
        self._member.adopt(records)
        await self._store.save(records)  # written as this worker's, so the stream says so

    async def _resync(self, epoch: str) -> None:
        """Redis lost its data (a restart without persistence): write back every job this
        worker owns and every lease it holds; the others' come back from their owners."""
        log.error(
            "Redis at %s lost the account's state; writing back this worker's %d jobs",
            self.account.url,
            len(self._slots.held),
        )
        self._epoch = epoch
        self._registered = False
        self._changes_from = self._durations_from = "0-0"
        assert self._member is not None
        self._store.forget()
        await self._store.save(self._member.owned())
        await self._heartbeat()

    async def _evicted(self) -> None:
        """Taken for dead (silent for half a lease): give up the jobs others adopted, keep
        the rest, and live on as a new registration."""
        assert self._member is not None
        mine = [record.id for record in self._member.owned() if not record.finished]
        owners = await self.redis.hmget(self.keys.owner, mine) if mine else []
        lost = [job for job, owner in zip(mine, owners, strict=True) if owner != self.worker]
        log.error(
            "this worker was taken for dead; %d of its jobs are followed elsewhere", len(lost)
        )
        if lost:
            self.disowned(lost)
        self._registered = False
        await self._heartbeat()

    async def _reader(self) -> None:
        """Replay the other workers' job changes into replicas, and learn from their
        completions."""
        while True:
            try:
                entries = await self.redis.xread(
                    {
                        self.keys.changes: self._changes_from,
                        self.keys.durations: self._durations_from,
                    },
                    count=500,
                    block=1000,
                )
            except RedisError as exc:
                await self.outage.failed("job changes are read when it is back", exc)
                continue
            self.outage.ok()
            for stream, items in entries or ():
                records: list[ka.JobRecord] = []
                for entry_id, fields in items:
                    if stream == self.keys.changes:
                        self._changes_from = entry_id
                        if fields.get("w") != self.worker:
                            with contextlib.suppress(
                                ValueError, TypeError, KeyError, ka.KlingError
                            ):
                                records.append(ka.JobRecord.from_dict(json.loads(fields["j"])))
                    else:
                        self._durations_from = entry_id
                        if fields.get("w") != self.worker:
                            self._learn(fields)
                if records:
                    assert self._member is not None
                    self._member.replicate(records)

    async def _signals(self) -> None:
        """Releases (wake the slot waiters), stops, pauses and hints from the other workers."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.signals)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and isinstance(message.get("data"), str):
                        self._signal(message["data"])
            except RedisError as exc:
                await self.outage.failed("signals are heard when it is back", exc)
                self._slots.wake()  # waiters look again themselves
            finally:
                with anyio.move_on_after(1.0, shield=True), contextlib.suppress(RedisError):
                    await pubsub.aclose()

    def _signal(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("t")
        if kind == "released":
            self._slots.wake()
            return
        if message.get("w") == self.worker:
            return
        if kind == "stop":
            self.told_stop(str(message.get("error") or "{}"))
        elif kind == "pause":
            seconds = message.get("seconds")
            if isinstance(seconds, int | float) and 0 < seconds < 3600:
                self._rate.pause(float(seconds), tell=False)
        elif kind == "hint" and self._member is not None:
            task_id, status = message.get("task"), message.get("status")
            if isinstance(task_id, str) and isinstance(status, str):
                self._member.hint(ka.Task(task_id=task_id, status=ka.TaskStatus(status)))
