"""Output for programs and for people who want less: ``--json``, ``--quiet``, ``status --json``.

Every batch here runs against the emulator in another process over loopback HTTP; the tests
read stdout and stderr as a script would: stdout of ``--json`` must parse line by line, and
say every row's way to its end and then the whole batch's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cli_helpers import KEY, EmulatorProcess, batch_command, run_main, write_prompts

FINAL = {"done", "failed", "rejected", "error"}


def json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        event = json.loads(line)  # every line of stdout is one JSON object, nothing else
        assert isinstance(event, dict)
        events.append(event)
    return events


def test_json_is_one_object_per_status_change_then_a_summary(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 12)
    out = tmp_path / "out"
    server.configure(failure_rate=0.3)
    result = run_main([*batch_command(prompts, out, server, progress=None), "--json"])
    assert result.code == 1, result.text
    events = json_lines(result.out)
    start, *changes, summary = events
    assert start["event"] == "start"
    assert start["rows"] == 12 and start["to_do"] == 12
    assert start["summary"] == str(out / "summary.json")
    assert {event["event"] for event in changes} == {"status"}
    by_row: dict[int, list[dict[str, Any]]] = {}
    for event in changes:
        assert set(event) == {
            "event",
            "time",
            "row",
            "line",
            "external_task_id",
            "task_id",
            "status",
            "error",
            "error_code",
            "file",
        }
        by_row.setdefault(event["row"], []).append(event)
    assert sorted(by_row) == list(range(1, 13))
    journal = {
        entry["row"]: entry for entry in json.loads((out / "summary.json").read_text())["rows"]
    }
    for number, seen in by_row.items():
        statuses = [event["status"] for event in seen]
        assert len(statuses) == len(set(statuses)), statuses  # a change each, said once
        assert statuses[-1] in FINAL and not FINAL & set(statuses[:-1]), statuses
        assert statuses[-1] == journal[number]["status"]
        last = seen[-1]
        assert last["external_task_id"] == journal[number]["external_task_id"]
        assert last["task_id"] == journal[number]["task_id"]
        if last["status"] == "done":
            assert "downloading" in statuses
            assert last["file"] == journal[number]["file"] and last["error"] is None
        else:
            assert last["error"] == "Video generation failed" and last["file"] is None
    failed = sorted(number for number, seen in by_row.items() if seen[-1]["status"] == "failed")
    assert failed, "failure_rate=0.3 failed no row of 12"
    assert summary["event"] == "summary"
    assert summary["exit_status"] == result.code
    assert summary["counts"] == {"done": 12 - len(failed), "failed": len(failed)}
    assert [row["row"] for row in summary["not_done"]] == failed
    assert summary["summary"] == str(out / "summary.json")
    # For a person, on stderr: the notes and the last line.
    assert (
        result.err.rstrip()
        .splitlines()[-1]
        .startswith(f"12 rows: {12 - len(failed)} done, {len(failed)} failed; all rows in")
    )
    assert "12 rows (batch" in result.err
    assert KEY not in result.out + result.err


def test_json_events_carry_the_api_error_code(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    server.configure(account_error=1102)
    result = run_main([*batch_command(prompts, out, server, progress=None), "--json"])
    assert result.code == 3, result.text
    events = json_lines(result.out)
    ended = [event for event in events if event["event"] == "status" and event["status"] == "error"]
    assert ended and {event["error_code"] for event in ended} == {1102}
    summary = events[-1]
    assert summary["exit_status"] == 3
    assert {row["error_code"] for row in summary["not_done"]} == {1102}
    assert "error: the account cannot create tasks" in result.err


def test_json_with_quiet_leaves_stderr_to_errors_and_the_last_line(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 4)
    out = tmp_path / "out"
    command = [*batch_command(prompts, out, server, progress=None), "--json", "--quiet"]
    result = run_main(command)
    assert result.code == 0, result.text
    events = json_lines(result.out)
    assert events[0]["event"] == "start" and events[-1]["event"] == "summary"
    assert events[-1]["counts"] == {"done": 4}
    assert result.err.splitlines() == [
        f"4 rows: 4 done; clips in {out}/, all rows in {out / 'summary.json'}"
    ]


def test_quiet_prints_only_the_last_line(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 6)
    out = tmp_path / "out"
    server.configure(failure_rate=0.5)
    result = run_main([*batch_command(prompts, out, server, progress=None), "--quiet"])
    assert result.code == 1, result.text
    assert result.err == ""
    [last] = result.out.splitlines()
    assert last.startswith("6 rows: ") and " failed; all rows in " in last
    assert str(out / "summary.json") in last
    # and errors, still: an account that cannot create tasks
    server.configure(failure_rate=0.0, account_error=1102)
    again = run_main([*batch_command(prompts, tmp_path / "o2", server, progress=None), "-q"])
    assert again.code == 3
    assert [line for line in again.err.splitlines() if line] == [
        line for line in again.err.splitlines() if line.startswith("error: ")
    ]
    assert "error: the account cannot create tasks" in again.err
    assert len(again.out.splitlines()) == 1


def test_status_json_reports_every_row(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 5)
    out = tmp_path / "out"
    server.configure(failure_rate=0.4)
    assert run_main(batch_command(prompts, out, server)).code == 1
    summary = json.loads((out / "summary.json").read_text())
    done = [row for row in summary["rows"] if row["status"] == "done"]
    assert done
    (out / done[0]["file"]).unlink()
    result = run_main(["status", str(out), "--json"])
    assert result.code == 0, result.err
    assert result.err == ""
    status = json.loads(result.out)
    assert status["total"] == 5
    assert status["journal"] == str(out / "kling-journal.sqlite3")
    assert status["counts"] == dict(
        sorted(
            {
                "done": len(done),
                "failed": 5 - len(done),
            }.items()
        )
    )
    assert status["missing_files"] == [done[0]["row"]]
    assert status["unfinished"] == 0
    assert [row["row"] for row in status["rows"]] == [1, 2, 3, 4, 5]
    for entry, row in zip(status["rows"], summary["rows"], strict=True):
        assert entry["status"] == row["status"]
        assert entry["task_id"] == row["task_id"]
        assert entry["external_task_id"] == row["external_task_id"]
        assert entry["error"] == row["error"]
        assert "video_url" not in entry

    missing = run_main(["status", str(tmp_path / "nowhere"), "--json"])
    assert missing.code == 2
    assert missing.out == ""
    assert "error: no journal at" in missing.err


def test_bad_combinations_are_usage_errors_of_batch(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    base = ["batch", str(prompts), "--out", str(tmp_path / "o")]
    for extra, words in (
        (["--json", "--progress", "live"], "argument --progress: not allowed with argument --json"),
        (["-q", "--progress", "plain"], "argument --progress: not allowed with argument --quiet"),
        (["--quiet", "--verbose"], "argument -v/--verbose: not allowed with argument -q/--quiet"),
    ):
        result = run_main([*base, *extra])
        assert result.code == 2, result.text
        assert result.out == ""
        usage, error = result.err.splitlines()
        assert usage == "usage: kling-async batch PROMPTS --out DIR [options]"
        assert error.startswith("kling-async batch: error: " + words), error
        assert error.endswith("(see kling-async batch --help)")
    assert not (tmp_path / "o").exists()


def test_dry_run_with_json_is_one_plan_object(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    result = run_main(["batch", str(prompts), "--out", str(out), "--dry-run", "--json"], key=None)
    assert result.code == 0, result.text
    [plan] = json_lines(result.out)
    assert plan["event"] == "plan"
    assert plan["rows"] == 3 and plan["plan"] == {"submit": 3}
    assert [step["row"] for step in plan["steps"]] == [1, 2, 3]
    assert {step["step"] for step in plan["steps"]} == {"submit"}
    assert "a real run needs a key" in result.err
    assert not out.exists()
