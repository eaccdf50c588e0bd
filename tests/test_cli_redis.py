"""``kling-async batch --redis``: one batch split between machines, judged by ground truth.

Each "machine" is a real ``kling-async batch`` process with its own out dir, all against one
emulator process (its ``created_per_external_id`` is the ground truth) and one real Redis
server that asks for a password (which must never show in any output or file). Two machines
split 40 rows, each row created once and its clip in exactly one out dir; a machine killed
with SIGKILL mid-run has its rows taken over by the other, nothing lost or created twice, and
its rerun resumes without sending anything.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kling_async.cli._prompts import Defaults, load_prompts
from kling_async.cli._shared import shared_batch_id
from kling_async.protocol.profiles import COMETAPI

from .cli_helpers import (
    KEY,
    SCALE,
    EmulatorProcess,
    Result,
    batch_command,
    check_no_key,
    child_env,
    cli_process,
    emulator_process,
    finish,
    journal_rows,
    kill_when,
    run_main,
    sha256_file,
    write_prompts,
)
from .redis_helpers import RedisServer, redis_server

#: Redis asks for it; it must appear nowhere (output, journal, summary).
PASSWORD = "rds-PASS-91c4e07b2a"
ROWS = 40
#: A machine silent for half of this (1 s) is taken for dead.
LEASE = "2"


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorProcess]:
    """One emulator for the module: a limit of 6 tasks at once (so rows wait for slots), and
    a repeated external_task_id accepted (a second create of a row would make a second task,
    so ``created_per_external_id`` shows any)."""
    with emulator_process("--concurrency-limit", "6", "--duplicate-external-id", "allow") as e:
        yield e


@pytest.fixture
def server(emu: EmulatorProcess) -> Iterator[RedisServer]:
    with redis_server() as running:
        redis.Redis(host="127.0.0.1", port=running.port).config_set("requirepass", PASSWORD)
        emu.configure(median_duration=400.0)  # 0.8 s a task at the tests' scale
        yield running
        emu.configure(median_duration=90.0)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def url_of(server: RedisServer) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"


def machine(
    prompts: Path, out: Path, emu: EmulatorProcess, server: RedisServer, *, via_env: bool = False
) -> subprocess.Popen[str]:
    """``kling-async batch --redis URL`` (or the URL in ``KLING_REDIS_URL``) as a process."""
    if via_env:
        command = batch_command(prompts, out, emu, "--redis-lease", LEASE)
        env = child_env(KLING_API_KEY=KEY, KLING_REDIS_URL=url_of(server))
        return cli_process(command, env)
    return cli_process(
        batch_command(prompts, out, emu, "--redis", url_of(server), "--redis-lease", LEASE)
    )


def done(process: subprocess.Popen[str]) -> Result:
    try:
        result = finish(process, timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()  # never left behind by a failing test
        process.communicate()
        raise
    check_secrets(result.out, result.err)
    return result


def check_secrets(*texts: str) -> None:
    check_no_key(*texts)
    for text in texts:
        assert PASSWORD not in text, "the Redis password leaked into the output"


def check_files_hold_no_secret(out: Path) -> None:
    for path in out.iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert PASSWORD.encode() not in data, f"the Redis password is in {path.name}"
            assert KEY.encode() not in data, f"the API key is in {path.name}"


def summary(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return result


def clips(out: Path) -> dict[str, str]:
    """The clips in an out dir: file name -> SHA-256."""
    return {path.name: sha256_file(path) for path in out.glob("*.mp4")}


def truth(emu: EmulatorProcess) -> dict[str, dict[str, Any]]:
    """The emulator's tasks by external_task_id."""
    return {task["external_task_id"]: task for task in emu.tasks() if task["external_task_id"]}


def check_batch(emu: EmulatorProcess, outs: list[Path]) -> set[str]:
    """Every row of the batch created exactly once, every clip present in at least one out
    dir and the emulator's own bytes. Returns the names of the clips in more than one."""
    journals = [journal_rows(out) for out in outs]
    rows = journals[0]
    assert len(rows) == ROWS
    for other in journals[1:]:
        # Every machine gives every row the same external_task_id (and file name).
        assert [(r["external_task_id"], r["file"]) for r in other] == [
            (r["external_task_id"], r["file"]) for r in rows
        ]
    created = emu.stats()["created_per_external_id"]
    assert [created.get(row["external_task_id"], 0) for row in rows] == [1] * ROWS
    tasks = truth(emu)
    held = [clips(out) for out in outs]
    for row in rows:
        [video] = tasks[row["external_task_id"]]["videos"]
        found = [files[row["file"]] for files in held if row["file"] in files]
        assert found, f"row {row['number']} has no clip in any out dir"
        assert set(found) == {video["sha256"]}
    twice = {name for name in held[0] if any(name in files for files in held[1:])}
    for out in outs:
        assert not [p.name for p in out.iterdir() if ".part" in p.name or p.name.endswith(".tmp")]
        check_files_hold_no_secret(out)
    return twice


def check_summary(out: Path, other_machines: set[str]) -> dict[str, Any]:
    """The summary says what this machine did (its clips are here) and the whole batch as
    Redis knows it: every row done, per machine."""
    data = summary(out)
    shared = data["shared"]
    assert "127.0.0.1" in shared["redis"]
    assert PASSWORD not in shared["redis"]
    me = shared["machine"]
    here = clips(out)
    for row in data["rows"]:
        if row["status"] == "done":
            assert row["file"] in here
            assert row["machine"] == me
        else:
            assert row["status"] == "elsewhere", row
            assert row["machine"] in other_machines
            assert row["machine_status"] == "done"
    assert shared["counts"] == {"done": ROWS}
    assert sum(counts["done"] for counts in shared["machines"].values()) == ROWS
    # What Redis says this machine did is what is in this out dir (a clip fetched here too,
    # after its first machine died having saved it, is counted once: by the first).
    assert shared["machines"].get(me, {}).get("done", 0) <= data["counts"].get("done", 0)
    return data


def test_two_machines_split_one_batch_each_row_once(
    emu: EmulatorProcess, server: RedisServer, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "prompts.txt", ROWS, tag="split")
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    processes = [
        machine(prompts, outs[0], emu, server),
        machine(prompts, outs[1], emu, server, via_env=True),
    ]
    results = [done(process) for process in processes]
    assert [result.code for result in results] == [0, 0], results[0].text + results[1].text

    twice = check_batch(emu, outs)
    assert twice == set(), "a clip was fetched by both machines"
    names = {summary(out)["shared"]["machine"] for out in outs}
    assert len(names) == 2
    a, b = (check_summary(out, names - {summary(out)["shared"]["machine"]}) for out in outs)
    # Split between them (each took rows as its slots freed), and nothing twice.
    assert a["counts"]["done"] > 0 and b["counts"]["done"] > 0
    assert a["counts"]["done"] + b["counts"]["done"] == ROWS
    assert a["shared"]["taken_over"] == b["shared"]["taken_over"] == 0
    for result in results:
        assert "shared through Redis at redis://127.0.0.1:" in result.out
        assert f"all machines (as Redis knows): {ROWS} rows: {ROWS} done" in result.out

    # status reads a shared journal: this machine's rows and the others' (elsewhere).
    status = run_main(["status", str(outs[0])])
    assert status.code == 0, status.text
    assert "shared through Redis" in status.out
    assert "elsewhere" in status.out and "not finished" not in status.out

    # A shared batch's journal is refused to a run that is not shared (nothing sent).
    creates = emu.stats()["requests_per_route"].get("create", 0)
    alone = run_main(batch_command(prompts, outs[0], emu))
    assert alone.code == 2, alone.text
    assert "several machines share through Redis" in alone.err and "--redis" in alone.err
    # Rerunning either machine sends nothing: the batch is done.
    again = done(machine(prompts, outs[1], emu, server))
    assert again.code == 0, again.text
    assert emu.stats()["requests_per_route"].get("create", 0) == creates


def test_a_machine_killed_mid_run_loses_no_row_and_repeats_none(
    emu: EmulatorProcess, server: RedisServer, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "prompts.txt", ROWS, tag="kill")
    killed, survivor = tmp_path / "machine-a", tmp_path / "machine-b"
    a = machine(prompts, killed, emu, server)
    b = machine(prompts, survivor, emu, server)
    # kill -9 once the doomed machine has saved a few clips, with rows still in flight.
    kill_when(a, lambda: sum(r["status"] == "done" for r in journal_rows(killed)) >= 2, 60)
    saved_before_the_kill = set(clips(killed))

    result = done(b)
    assert result.code == 0, result.text
    assert "taking over" in result.out and "stopped answering or left" in result.out
    twice = check_batch(emu, [killed, survivor])
    # A clip is fetched twice only if its machine died between saving it and saying so in
    # Redis (a few milliseconds): at most the downloads it had at once (4).
    assert twice <= saved_before_the_kill
    assert len(twice) <= 4
    survived = summary(survivor)
    assert survived["shared"]["taken_over"] > 0
    assert survived["shared"]["counts"] == {"done": ROWS}
    by_machine = survived["shared"]["machines"]
    assert sum(counts["done"] for counts in by_machine.values()) == ROWS

    # The killed machine's rerun resumes: nothing sent again, its clips verified, the rest
    # of the batch known to be done elsewhere.
    creates = emu.stats()["requests_per_route"].get("create", 0)
    rerun = done(machine(prompts, killed, emu, server))
    assert rerun.code == 0, rerun.text
    assert emu.stats()["requests_per_route"].get("create", 0) == creates
    check_batch(emu, [killed, survivor])
    names = {summary(killed)["shared"]["machine"], survived["shared"]["machine"]}
    assert len(names) == 2
    check_summary(killed, names - {summary(killed)["shared"]["machine"]})
    check_summary(survivor, names - {survived["shared"]["machine"]})
    assert set(clips(killed)) >= saved_before_the_kill


def test_the_batch_id_is_the_files_rows(tmp_path: Path) -> None:
    """Same rows => same batch id (comments and blank lines aside); other rows or other
    request defaults => another batch."""

    def batch_of(text: str, defaults: Defaults | None = None) -> str:
        path = tmp_path / "p.txt"
        path.write_text(text)
        rows = load_prompts(path, defaults or Defaults(), COMETAPI).rows
        return shared_batch_id("https://api.example", rows)

    one = batch_of("a fox\na hare\na fox\n")
    assert batch_of("# comment\na fox\n\n  a hare\na fox\n") == one
    assert batch_of("a fox\na hare\n") != one
    assert batch_of("a fox\na hare\na fox\n", Defaults(mode="pro")) != one
    assert len(one) == 12 and int(one, 16) >= 0


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"redis://:{PASSWORD}@127.0.0.1:99999/0", "it cannot be parsed"),
        (f"redis://:{PASSWORD}@/0", "it names no host"),
        (f"http://u:{PASSWORD}@127.0.0.1/0", "must start with redis://, rediss:// or unix://"),
        (f"redis://:{PASSWORD}@127.0.0.1/abc", "the path is the database number"),
        (f"redis://127.0.0.1/0?db=x&password={PASSWORD}", "redis-py refuses it"),
    ],
)
def test_a_bad_redis_url_is_refused_before_anything(url: str, words: str, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    for args, env in (
        (["--redis", url], None),
        ([f"--redis={url}"], None),
        ([], {"KLING_REDIS_URL": url}),
    ):
        result = run_main(
            ["batch", str(prompts), "--out", str(out), "--base-url", "http://127.0.0.1:9", *args],
            env=env,
        )
        check_secrets(result.out, result.err)
        assert result.code == 2, result.text
        assert "is not a usable Redis URL" in result.err and words in result.err
        source = "KLING_REDIS_URL" if env else "--redis"
        assert result.err.startswith(f"error: {source}")
        assert not out.exists()  # nothing made, nothing sent


def test_redis_sharing_refuses_what_cannot_be_shared(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    url = f"redis://:{PASSWORD}@127.0.0.1:9/0"
    emulator = run_main(["batch", str(prompts), "--out", str(out), "--emulator", "--redis", url])
    assert emulator.code == 2 and "kling-async emulator" in emulator.err
    retry = run_main(["batch", str(prompts), "--out", str(out), "--retry-failed", "--redis", url])
    assert retry.code == 2 and "--retry-failed is not available" in retry.err
    lease = run_main(
        ["batch", str(prompts), "--out", str(out), "--redis", url, "--redis-lease", "0"]
    )
    assert lease.code == 2 and "--redis-lease" in lease.err
    for result in (emulator, retry, lease):
        check_secrets(result.out, result.err)
    assert not out.exists()


def test_an_unreachable_redis_is_said_before_anything_is_sent(
    emu: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2, tag="unreachable")
    out = tmp_path / "out"
    creates = emu.stats()["requests_per_route"].get("create", 0)
    result = run_main(
        batch_command(prompts, out, emu, "--redis", f"redis://:{PASSWORD}@127.0.0.1:9/0")
    )
    check_secrets(result.out, result.err)
    assert result.code == 2, result.text
    assert "Redis at redis://127.0.0.1:9/0 is unreachable" in result.err
    assert "nothing was sent" in result.err
    assert emu.stats()["requests_per_route"].get("create", 0) == creates
    assert not (out / "kling-journal.sqlite3").exists()


def test_rows_that_ended_with_no_task_on_a_machine_that_left_are_sent_by_another(
    server: RedisServer, tmp_path: Path
) -> None:
    """Machine A cannot reach the API (exit 4): its rows end with no task, and it leaves.
    Once the API is up, machine B takes them over: their jobs (A's, ended) are let go, then
    looked up and created, once each."""
    port = closed_port()
    prompts = write_prompts(tmp_path / "prompts.txt", 6, tag="no-task")
    a_out, b_out = tmp_path / "machine-a", tmp_path / "machine-b"

    def on(out: Path) -> list[str]:
        return [
            "batch", str(prompts), "--out", str(out), "--progress", "plain",
            "--base-url", f"http://127.0.0.1:{port}", "--time-scale", str(SCALE),
            "--redis", url_of(server), "--redis-lease", LEASE,
        ]  # fmt: skip

    first = done(cli_process([*on(a_out), "--unreachable-after", "1"]))
    assert first.code == 4, first.text
    assert "left unclaimed" in first.out
    stopped = [row for row in journal_rows(a_out) if row["error"]]
    assert stopped, "no row of A ended"
    with emulator_process("--port", str(port), "--duplicate-external-id", "allow") as up:
        second = done(cli_process(on(b_out)))
        assert second.code == 0, second.text
        assert "taking over" in second.out
        created = up.stats()["created_per_external_id"]
        rows = journal_rows(b_out)
        assert [created.get(row["external_task_id"], 0) for row in rows] == [1] * 6
        assert len(clips(b_out)) == 6
        assert summary(b_out)["shared"]["counts"] == {"done": 6}
        # A's rerun: nothing of its own left, nothing sent.
        creates = up.stats()["requests_per_route"].get("create", 0)
        rerun = done(cli_process(on(a_out)))
        assert rerun.code == 0, rerun.text
        assert up.stats()["requests_per_route"].get("create", 0) == creates
