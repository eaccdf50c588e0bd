"""The job store contract, run against every store: ``save`` upserts by id, ``load`` returns
the last write of every id, records survive a reopen, concurrent saves lose nothing. Then what
only the SQLite file has to get right: durability settings, other versions' files, other
owners' tables."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import client_for

StoreFactory = Callable[[Path], contextlib.AbstractAsyncContextManager[ka.JobStore]]


def memory_factory() -> StoreFactory:
    """One store object for the whole test: "reopening" it is using it again."""
    store = ka.MemoryJobStore()

    @contextlib.asynccontextmanager
    async def opened(_path: Path) -> AsyncIterator[ka.JobStore]:
        yield store

    return opened


def sqlite_factory() -> StoreFactory:
    @contextlib.asynccontextmanager
    async def opened(path: Path) -> AsyncIterator[ka.JobStore]:
        async with ka.SQLiteJobStore(path / "jobs.sqlite3") as store:
            yield store

    return opened


FACTORIES = {"memory": memory_factory, "sqlite": sqlite_factory}


@pytest.fixture(params=sorted(FACTORIES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- records ------------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30).filter(
    lambda value: value.strip() != ""
)
moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
).map(lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000))
requests = st.builds(
    ka.Text2VideoRequest,
    prompt=text,
    negative_prompt=st.none() | text,
    model_name=st.none() | st.sampled_from(["kling-v1", "kling-v2-6"]),
    mode=st.none() | st.sampled_from(["std", "pro"]),
    duration=st.none() | st.sampled_from(["5", "10"]),
    external_task_id=st.none() | text,
    extra=st.dictionaries(st.sampled_from(["sound", "multi_shot"]), st.sampled_from(["on", 1])),
)
videos = st.builds(
    ka.Video,
    id=text,
    url=st.just("https://cdn.example.com/v.mp4"),
    duration=st.none() | st.floats(0.5, 20.0),
)
tasks = st.builds(
    ka.Task,
    task_id=text,
    status=st.sampled_from([s for s in ka.TaskStatus if s is not ka.TaskStatus.UNKNOWN]),
    status_message=st.just("") | text,
    external_task_id=st.none() | text,
    videos=st.lists(videos, max_size=2).map(tuple),
    created_at=st.none() | moments,
    updated_at=st.none() | moments,
).map(lambda task: attrs.evolve(task, raw_status=task.status.value))
IDS = ["job-1", "job-2", "job-3", "kb-ab12-4"]
records = st.builds(
    ka.JobRecord,
    id=st.sampled_from(IDS),
    request=st.none() | requests,
    task_id=st.none() | text,
    status=st.sampled_from(list(ka.JobStatus)),
    task=st.none() | tasks,
    sent=st.booleans(),
    possible_duplicate=st.booleans(),
    error=st.none() | text,
    error_type=st.none() | st.sampled_from(["PolicyError", "UnreachableError"]),
    created_at=st.floats(0, 2e9),
    updated_at=st.floats(0, 2e9),
)


def record(id_: str, **fields: Any) -> ka.JobRecord:
    return ka.JobRecord(id=id_, request=ka.Text2VideoRequest(prompt=f"p {id_}"), **fields)


def by_id(loaded: list[ka.JobRecord]) -> dict[str, ka.JobRecord]:
    found = {r.id: r for r in loaded}
    assert len(found) == len(loaded), "load() returned an id twice"
    return found


# --- the contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(records, max_size=5), max_size=6))
def test_load_returns_the_last_write_of_every_id(
    name: str, batches: list[list[ka.JobRecord]]
) -> None:
    expected: dict[str, ka.JobRecord] = {}
    for batch in batches:
        for item in batch:
            expected[item.id] = item

    async def run(path: Path) -> None:
        factory = FACTORIES[name]()
        async with factory(path) as store:
            for batch in batches:
                await store.save(batch)
            assert by_id(await store.load()) == expected
        async with factory(path) as store:  # and again after a reopen
            assert by_id(await store.load()) == expected

    with tempfile.TemporaryDirectory() as directory:
        anyio.run(run, Path(directory), backend="asyncio")


@pytest.mark.anyio
async def test_records_survive_a_reopen(kind: str, tmp_path: Path) -> None:
    factory = FACTORIES[kind]()
    first = record("a", sent=True)
    async with factory(tmp_path) as store:
        assert await store.load() == []
        await store.save([first, record("b")])
        await store.save([])  # nothing to write is not an error
    ended = attrs.evolve(first, task_id="t-1", status=ka.JobStatus.FAILED, error="it failed")
    async with factory(tmp_path) as store:
        assert by_id(await store.load()) == {"a": first, "b": record("b")}
        await store.save([ended])
    async with factory(tmp_path) as store:
        assert by_id(await store.load()) == {"a": ended, "b": record("b")}


@pytest.mark.anyio
async def test_concurrent_saves_from_many_tasks_lose_nothing(kind: str, tmp_path: Path) -> None:
    factory = FACTORIES[kind]()
    writers, rounds = 8, 5

    async def writer(store: ka.JobStore, number: int) -> None:
        for step in range(rounds):
            await store.save([record(f"w{number}-{i}", updated_at=float(step)) for i in range(3)])

    async with factory(tmp_path) as store:
        async with anyio.create_task_group() as group:
            for number in range(writers):
                group.start_soon(writer, store, number)
        loaded = by_id(await store.load())
    assert set(loaded) == {f"w{n}-{i}" for n in range(writers) for i in range(3)}
    assert {r.updated_at for r in loaded.values()} == {float(rounds - 1)}


def test_every_store_is_a_job_store() -> None:
    assert isinstance(ka.MemoryJobStore(), ka.JobStore)
    assert isinstance(ka.SQLiteJobStore("unused.sqlite3"), ka.JobStore)


# --- the SQLite file ------------------------------------------------------------------------------


def connect(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


@pytest.mark.anyio
async def test_the_file_is_wal_fully_synced_and_readable_while_open(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with ka.SQLiteJobStore(path) as store:
        await store.save([record("a", task_id="t-1", status=ka.JobStatus.PROCESSING)])
        with connect(path) as db:  # another connection sees a committed write at once
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("SELECT id, task_id, status FROM kling_jobs").fetchall() == [
                ("a", "t-1", "processing")
            ]
        synchronous = await anyio.to_thread.run_sync(
            lambda: store._db.execute("PRAGMA synchronous").fetchone()  # type: ignore[union-attr]
        )
        assert synchronous == (2,)  # FULL: a commit is on disk when save() returns


@pytest.mark.anyio
async def test_a_file_of_a_newer_layout_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with ka.SQLiteJobStore(path) as store:
        await store.save([record("a")])
    with connect(path) as db:
        db.execute("UPDATE kling_jobs_meta SET value = '99' WHERE key = 'schema'")
    before = path.read_bytes()
    store = ka.SQLiteJobStore(path)
    with pytest.raises(ka.JobStoreError, match=r"layout '99'.*this one reads layout 1") as caught:
        await store.open()
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    with pytest.raises(ka.UsageError, match="not open"):
        await store.load()


@pytest.mark.anyio
async def test_columns_and_json_keys_of_a_later_version_are_tolerated_and_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = record("a", task=ka.Task(task_id="t-1", status=ka.TaskStatus.SUBMITTED))
    async with ka.SQLiteJobStore(path) as store:
        await store.save([first])
    with connect(path) as db:
        db.execute("ALTER TABLE kling_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
        db.execute("UPDATE kling_jobs SET priority = 7")
        for column in ("request", "task"):
            (stored,) = db.execute(f"SELECT {column} FROM kling_jobs").fetchone()  # noqa: S608
            value = json.loads(stored)
            value["added_later"] = {"nested": True}
            db.execute(f"UPDATE kling_jobs SET {column} = ?", (json.dumps(value),))  # noqa: S608
        db.execute("INSERT INTO kling_jobs_meta (key, value) VALUES ('added_later', 'x')")
        db.execute(
            "INSERT INTO kling_jobs (id, status, created_at, updated_at) "
            "VALUES ('b', 'paused_by_a_later_version', 0, 0)"
        )
    async with ka.SQLiteJobStore(path) as store:
        loaded = by_id(await store.load())
        # The task reads as it was; a request field of a later version is sent as it would
        # send it (in extra), not refused and not dropped from a resubmission.
        assert attrs.evolve(loaded["a"], request=first.request) == first
        assert loaded["a"].request is not None
        assert loaded["a"].request.extra == {"added_later": {"nested": True}}
        # A status this version does not know is not taken as an end: the job is followed.
        assert loaded["b"].status is ka.JobStatus.UNKNOWN
        await store.save([attrs.evolve(first, status=ka.JobStatus.SUBMITTED)])
    with connect(path) as db:
        # An upsert, not a replace: the later version's column keeps its value.
        assert db.execute("SELECT status, priority FROM kling_jobs WHERE id = 'a'").fetchone() == (
            "submitted",
            7,
        )


@pytest.mark.anyio
async def test_the_file_may_hold_other_tables_and_they_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite3"
    with connect(path) as db:
        db.execute("CREATE TABLE rows (key TEXT PRIMARY KEY, status TEXT)")
        db.execute("INSERT INTO rows VALUES ('r1', 'mine')")
    async with ka.SQLiteJobStore(path) as store:
        await store.save([record("a")])
    with connect(path) as db:
        assert db.execute("SELECT * FROM rows").fetchall() == [("r1", "mine")]


@pytest.mark.anyio
async def test_a_file_that_is_not_sqlite_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    path.write_text("just some text, not a database " * 50)
    with pytest.raises(ka.JobStoreError, match="is not a usable job store"):
        await ka.SQLiteJobStore(path).open()


@pytest.mark.anyio
async def test_open_twice_is_misuse_and_aclose_twice_is_fine(tmp_path: Path) -> None:
    store = ka.SQLiteJobStore(tmp_path / "jobs.sqlite3")
    await store.open()
    try:
        with pytest.raises(ka.UsageError, match="already open"):
            await store.open()
    finally:
        await store.aclose()
    await store.aclose()
    with pytest.raises(ka.UsageError, match="not open"):
        await store.save([record("a")])


# --- with a client ----------------------------------------------------------------------------


def every_byte_in(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(directory.iterdir()))


@pytest.mark.anyio
async def test_a_client_keeps_its_jobs_in_the_file_and_never_its_key(
    emu: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with client_for(emu, store=path) as kling:
        job = kling.submit(ka.Text2VideoRequest(prompt="a cat surfing"))
        task = await job.wait()
    stored = every_byte_in(tmp_path)  # the -wal file included
    assert emu.api_key.encode() not in stored
    # A store object is its owner's: the client uses it and leaves it open.
    async with ka.SQLiteJobStore(path) as store:
        async with client_for(emu, store=store) as kling:
            again = kling.job(job.id)
            assert again is not None
            assert again.status is ka.JobStatus.SUCCEEDED
            assert kling.job(task.task_id) is again
        [record_] = await store.load()
    assert (record_.id, record_.task_id, record_.status) == (
        job.id,
        task.task_id,
        ka.JobStatus.SUCCEEDED,
    )
    assert record_.request == attrs.evolve(
        ka.Text2VideoRequest(prompt="a cat surfing"), external_task_id=job.id
    )
