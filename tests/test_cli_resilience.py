"""The batch tool when the world misbehaves: an API that cannot be reached, result URLs that
point where they must not, a backend that may keep a repeated create, and a kill -9 of a run
on the built-in emulator. Each judged by what the person sees and by ground truth."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import anyio

from kling_async.testing import Emulator

from .cli_helpers import (
    ROOT,
    EmulatorProcess,
    batch_command,
    check_no_key,
    cli_process,
    journal_rows,
    kill_when,
    run_cli,
    write_prompts,
)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_an_unreachable_api_is_said_while_retrying_then_stops_with_exit_4(
    tmp_path: Path,
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = [
        "batch", str(prompts), "--out", str(out), "--progress", "plain",
        "--base-url", f"http://127.0.0.1:{closed_port()}", "--unreachable-after", "2",
    ]  # fmt: skip
    process = cli_process(command)
    assert process.stdout is not None
    lines: list[str] = []
    running_when_said = None
    for line in process.stdout:
        lines.append(line)
        if running_when_said is None and "cannot reach 127.0.0.1 (connection refused)" in line:
            running_when_said = process.poll() is None
    _, err = process.communicate(timeout=60)
    check_no_key("".join(lines), err)
    text = "".join(lines)
    assert process.returncode == 4, text + err
    assert running_when_said, "the first connection failure was only said at the end"
    assert text.count("cannot reach 127.0.0.1 (connection refused)") == 1
    assert "giving up" in text and "3 rows stopped" in text
    assert "cannot reach 127.0.0.1 (connection refused, for 2 s)" in err
    assert "rerun the same command" in err
    rows = journal_rows(out)
    assert [row["status"] for row in rows] == ["pending"] * 3  # a rerun resumes them


def test_a_refused_result_url_is_a_row_error_and_a_rerun_downloads_it(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.configure(result_url="http://169.254.169.254/latest/meta-data/{video_id}")
    first = run_cli(command)
    assert first.code == 1, first.text
    assert "refusing to download" in first.text and "169.254.169.254" in first.text
    assert not list(out.glob("*.mp4"))
    summary = json.loads((out / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["error", "error"]
    assert all("link-local" in row["error"] for row in summary["rows"])

    server.configure(result_url=None)
    second = run_cli(command)
    assert second.code == 0, second.text
    assert len(list(out.glob("*.mp4"))) == 2
    created = server.stats()["created_per_external_id"]
    assert sorted(created.values()) == [1, 1]  # downloaded again, never created again


def test_rows_that_may_hold_two_tasks_are_flagged_in_the_summary(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    """The backend accepts a repeated id and shows a task to lookups only after a while: a
    create whose reply was dropped is re-sent, and its row says it may have two tasks."""
    prompts = write_prompts(tmp_path / "p.txt", 6)
    out = tmp_path / "out"
    server.configure(duplicate_external_id="allow", visibility_lag=60.0)
    server.faults({"create": {"DROP_AFTER_COMMIT": 0.5}})
    result = run_cli(batch_command(prompts, out, server))
    assert result.code == 0, result.text
    created = server.stats()["created_per_external_id"]
    summary = json.loads((out / "summary.json").read_text())["rows"]
    doubled = {ext for ext, count in created.items() if count > 1}
    assert doubled, "the faults never made a second task: the test proves nothing"
    for row in summary:
        assert row["possible_duplicate"] is (row["external_task_id"] in doubled)
    assert f"{len(doubled)} rows may have two tasks" in result.out


def test_a_killed_emulator_run_resumes_without_sending_any_row_again(tmp_path: Path) -> None:
    """The README's demo: kill -9 the emulator batch mid-run, rerun the same command."""
    out = tmp_path / "clips"
    command = [
        "batch", str(ROOT / "examples" / "prompts.txt"), "--out", str(out), "--emulator",
        "--progress", "plain", "--time-scale", "0.01", "--max-active", "4",
    ]  # fmt: skip
    batch = cli_process(command)

    def some_sent() -> bool:
        rows = journal_rows(out)
        return sum(row["task_id"] is not None for row in rows) >= 4

    kill_when(batch, some_sent)
    before = {row["external_task_id"]: row["task_id"] for row in journal_rows(out)}
    assert any(task_id is None for task_id in before.values())  # some rows still to send

    again = run_cli(command, timeout=120)
    assert again.code == 0, again.text
    rows = journal_rows(out)
    assert [row["status"] for row in rows] == ["done"] * len(rows)
    for row in rows:
        if before.get(row["external_task_id"]):
            assert row["task_id"] == before[row["external_task_id"]]

    async def ground_truth() -> dict[str, int]:
        async with Emulator(state_path=out / ".kling-emulator.sqlite3") as emu:
            return dict(emu.stats.created_per_external_id)

    created = anyio.run(ground_truth)
    assert sorted(created) == sorted(row["external_task_id"] for row in rows)
    assert set(created.values()) == {1}


def test_the_emulator_state_lives_in_the_out_dir_and_a_lost_one_restarts_rows(
    tmp_path: Path,
) -> None:
    out = tmp_path / "clips"
    prompts = write_prompts(tmp_path / "p.txt", 2)
    command = ["batch", str(prompts), "--out", str(out), "--emulator", "--progress", "plain"]
    batch = cli_process([*command, "--time-scale", "0.5"])  # tasks of 45 s: still running

    def all_sent() -> bool:
        rows = journal_rows(out)
        return bool(rows) and all(row["task_id"] for row in rows)

    kill_when(batch, all_sent)
    (out / ".kling-emulator.sqlite3").unlink()
    for leftover in out.glob(".kling-emulator.sqlite3-*"):
        leftover.unlink()
    again = run_cli(command, timeout=120)
    assert again.code == 0, again.text
    assert [row["status"] for row in journal_rows(out)] == ["done", "done"]
    assert [row["attempt"] for row in journal_rows(out)] == [2, 2]


def test_no_row_of_the_readme_demo_is_flagged_as_a_possible_duplicate(tmp_path: Path) -> None:
    out = tmp_path / "clips"
    result = run_cli(["batch", "examples/prompts.txt", "--out", str(out), "--emulator"])
    assert result.code == 0, result.text
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert not any(row["possible_duplicate"] for row in summary)
