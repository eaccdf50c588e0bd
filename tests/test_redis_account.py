"""Several clients sharing one account through a real Redis server (in one process here;
the multi-process runs are in ``test_redis_workers.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import kling_async as ka
import kling_async.redis as redis_module
from kling_async.redis import RedisAccount
from kling_async.testing import Emulator

from .conftest import SCALE, client_for
from .redis_helpers import RedisServer, redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


def account(server: RedisServer, **options: object) -> RedisAccount:
    return RedisAccount(server.url, lease_ttl=2.0, **options)  # type: ignore[arg-type]


def requests(n: int, prefix: str = "row") -> list[ka.Text2VideoRequest]:
    return [
        ka.Text2VideoRequest(prompt=f"clip {i}", external_task_id=f"{prefix}-{i}") for i in range(n)
    ]


async def test_two_clients_share_the_slots_and_see_each_others_jobs(server: RedisServer) -> None:
    async with Emulator(time_scale=SCALE, seed=3, concurrency_limit=4) as emu:
        async with (
            client_for(emu, account=account(server)) as a,
            client_for(emu, account=account(server)) as b,
        ):
            jobs_a = a.submit_many(requests(15, "a"))
            jobs_b = b.submit_many(requests(15, "b"))
            with anyio.fail_after(60):
                for job in [*jobs_a, *jobs_b]:
                    await job.wait()
            # b sees a's jobs (replicas) as they ended, and the other way round.
            with anyio.fail_after(10):
                while any(
                    (seen := b.job(job.id)) is None or not seen.done for job in jobs_a
                ) or any((seen := a.job(job.id)) is None or not seen.done for job in jobs_b):
                    await anyio.sleep(0.05)
            assert b.job("a-3") is not None
            assert b.job("a-3").task_id == a.job("a-3").task_id  # type: ignore[union-attr]
        assert emu.stats.peak_active <= 4
        assert emu.stats.created_per_external_id == {
            r.external_task_id: 1 for r in [*requests(15, "a"), *requests(15, "b")]
        }


async def test_one_id_given_to_two_clients_makes_one_task(server: RedisServer) -> None:
    """The first client to write a job id owns it; the other's job becomes its replica.
    Eight rounds on fresh pairs of clients: which one's record and which one's slot land
    first varies, and no order may leave both giving the job up (seen once in eight)."""
    for round_ in range(8):
        request = ka.Text2VideoRequest(prompt="a shared clip", external_task_id="shared-1")
        async with Emulator(time_scale=SCALE, seed=5) as emu:
            async with (
                client_for(emu, account=account(server, namespace=f"r{round_}")) as a,
                client_for(emu, account=account(server, namespace=f"r{round_}")) as b,
            ):
                job_a = a.submit(request)
                job_b = b.submit(request)
                with anyio.fail_after(30):
                    while not (job_a.done and job_b.done):
                        await anyio.sleep(0.02)
                assert job_a.task_id == job_b.task_id
                assert job_a.status is job_b.status is ka.JobStatus.SUCCEEDED
            assert emu.stats.created_per_external_id == {"shared-1": 1}


async def test_a_job_given_up_while_its_slot_is_being_leased_gives_the_slot_back(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails before the fix: the other client's record landed (so this client's write was
    refused and its job disowned) while this client's slot lease was in flight. The lease
    came back granted, was kept, and was renewed by every heartbeat for a job this client
    no longer followed: the owner waited for that slot forever (1 run in ~300 of
    test_one_id_given_to_two_clients_makes_one_task on a busy machine)."""
    real_script = redis_module._Binding.script
    disowned_during: list[str] = []

    def script(self: Any, source: str) -> Any:
        run = real_script(self, source)
        if source is not redis_module._ACQUIRE or disowned_during:
            return run

        async def acquire(*, keys: list[str], args: list[Any]) -> Any:
            answer = await run(keys=keys, args=args)
            if answer[0] in ("ok", b"ok"):
                job_id = str(args[0])
                disowned_during.append(job_id)
                self.disowned([job_id])  # what a save refused for another owner's record does
            return answer

        return acquire

    monkeypatch.setattr(redis_module._Binding, "script", script)
    async with Emulator(time_scale=SCALE, seed=5, median_duration=5000.0) as emu:
        async with client_for(emu, account=account(server)) as kling:
            job = kling.submit(ka.Text2VideoRequest(prompt="raced", external_task_id="raced-1"))
            with anyio.fail_after(10):
                while not disowned_during:
                    await anyio.sleep(0.01)
            slots = kling._tracker.slots
            assert isinstance(slots, redis_module._Slots)
            redis = slots._b.redis
            with anyio.fail_after(5):
                while "raced-1" in slots.held or await redis.zscore(slots._b.keys.slots, "raced-1"):
                    await anyio.sleep(0.05)
            assert job.task_id is None
            assert emu.stats.created_per_external_id == {}


async def test_an_account_fatal_answer_met_by_one_client_stops_the_other(
    server: RedisServer,
) -> None:
    async with Emulator(time_scale=SCALE, seed=5, median_duration=5000.0) as emu:
        async with (
            client_for(emu, account=account(server)) as a,
            client_for(emu, account=account(server)) as b,
        ):
            emu.force_account_error(1102)
            failed = a.submit(ka.Text2VideoRequest(prompt="in arrears"))
            with anyio.fail_after(10):
                while not failed.done:
                    await anyio.sleep(0.02)
            assert isinstance(failed.error, ka.AccountError)
            emu.force_account_error(None)  # b must not find out by trying
            creates = emu.stats.requests_per_route["create"]
            later = b.submit(ka.Text2VideoRequest(prompt="after the stop"))
            with anyio.fail_after(1.0):  # the bound: within a second
                while not later.done:
                    await anyio.sleep(0.01)
            assert isinstance(later.error, ka.AccountError)
            assert "another client of the account" in str(later.error)
            assert emu.stats.requests_per_route["create"] == creates


async def test_a_1303_met_by_one_client_lowers_the_limit_for_both(server: RedisServer) -> None:
    async with Emulator(time_scale=SCALE, seed=8, concurrency_limit=3) as emu:
        async with (
            client_for(emu, account=account(server)) as a,
            client_for(emu, account=account(server)) as b,
        ):
            jobs = a.submit_many(requests(12, "a"))
            with anyio.fail_after(60):
                for job in jobs:
                    await job.wait()
            assert a.stats.active_limit <= 4  # learned, at most one probe above 3
            later = b.submit_many(requests(12, "b"))
            with anyio.fail_after(60):
                for job in later:
                    await job.wait()
            # b started from a's lesson: at most a probe's 1303 more, not a fresh burst.
            assert b.stats.concurrency_limited <= 2
        assert emu.stats.peak_active <= 3


async def test_replicas_show_in_the_other_clients_events(server: RedisServer) -> None:
    async with Emulator(time_scale=SCALE, seed=9) as emu:
        async with (
            client_for(emu, account=account(server)) as a,
            client_for(emu, account=account(server)) as b,
        ):
            seen: list[tuple[str, ka.JobStatus]] = []

            async def watch() -> None:
                async for event in b.events():
                    seen.append((event.job.id, event.job.status))
                    if event.job.status.is_terminal:
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await anyio.sleep(0.05)
                job = a.submit(ka.Text2VideoRequest(prompt="watched", external_task_id="w-1"))
                with anyio.fail_after(30):
                    await job.wait()
            statuses = [status for job_id, status in seen if job_id == "w-1"]
            assert statuses[-1] is ka.JobStatus.SUCCEEDED
            assert len(statuses) >= 2  # its way there, not only its end
            replica = b.job("w-1")
            assert replica is not None and replica.task == job.task


async def test_nothing_secret_is_written_to_redis(server: RedisServer) -> None:
    import redis as redis_sync

    key = "sk-canary-redis-0123456789abcdef"
    token = "tok_" + "x" * 40
    async with Emulator(time_scale=SCALE, seed=4, api_keys=[key]) as emu:
        async with client_for(
            emu,
            api_key=key,
            account=account(server),
            callback_url=f"http://127.0.0.1:9/kling/callbacks/{token}",
        ) as a:
            jobs = a.submit_many(requests(5))
            with anyio.fail_after(30):
                for job in jobs:
                    await job.wait()
    dump: Any = redis_sync.Redis.from_url(server.url)
    blob = b""
    for name in dump.scan_iter("*"):
        blob += name
        kind = dump.type(name)
        if kind == b"string":
            blob += dump.get(name) or b""
        elif kind == b"hash":
            blob += b"".join(k + v for k, v in dump.hgetall(name).items())
        elif kind == b"zset":
            blob += b"".join(m for m, _ in dump.zrange(name, 0, -1, withscores=True))
        elif kind == b"set":
            blob += b"".join(dump.smembers(name))
        elif kind == b"stream":
            for _, fields in dump.xrange(name):
                blob += b"".join(k + v for k, v in fields.items())
    dump.close()
    assert b"job:row-0" in blob  # the dump did read the records
    assert key.encode() not in blob
    assert token.encode() not in blob
    assert b"callbacks" not in blob


def test_bad_settings_are_refused_before_any_connection() -> None:
    with pytest.raises(ka.ValidationError, match="url") as caught:
        RedisAccount("http://user:hunter2@example.com:6379")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ka.ValidationError, match="lease_ttl"):
        RedisAccount(lease_ttl=0)
    with pytest.raises(ka.UsageError, match="store"):
        ka.KlingClient(api_key="sk-x", account=RedisAccount(), store=ka.MemoryJobStore())
    shown = RedisAccount("redis://:hunter2@127.0.0.1:6390/0")
    assert "hunter2" not in repr(shown) and "hunter2" not in shown.url


async def test_an_unreachable_redis_says_so_when_the_client_opens() -> None:
    port = 1  # nothing listens there
    client = ka.KlingClient(
        api_key="sk-x",
        base_url="http://127.0.0.1:9",
        account=RedisAccount(f"redis://:hunter2@127.0.0.1:{port}/0"),
    )
    with anyio.fail_after(30), pytest.raises(ka.JobStoreError, match="unreachable") as caught:
        async with client:
            pass
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("url", ["redis://", "rediss://:pw@", "unix://", "redis:/0"])
def test_a_url_without_a_host_is_refused(url: str) -> None:
    with pytest.raises(ka.ValidationError, match="with a host") as caught:
        RedisAccount(url)
    assert "pw" not in str(caught.value)


async def test_a_poll_that_saw_nothing_new_is_not_written(server: RedisServer) -> None:
    """Every other client replays each record written: only changes are written."""
    import redis as redis_sync

    async with Emulator(time_scale=SCALE, seed=6, median_duration=400.0) as emu:
        async with client_for(emu, account=account(server)) as a:
            jobs = a.submit_many(requests(3))
            with anyio.fail_after(60):
                for job in jobs:
                    await job.wait()
            polls = a.stats.polls
    dump: Any = redis_sync.Redis.from_url(server.url)
    [changes] = list(dump.scan_iter("*changes"))
    written = dump.xlen(changes)
    dump.close()
    assert polls >= 3 * 8  # many polls saw the same status
    # queued, submitting, submitted, a fresher snapshot, processing, succeed; the last may be
    # written again by the close when the write in flight was cancelled after it landed.
    assert written <= 3 * 7
