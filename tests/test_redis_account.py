"""Several clients sharing one account through a real Redis server (in one process here;
the multi-process runs are in ``test_redis_workers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

import kling_async as ka
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
