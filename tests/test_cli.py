"""``kling-async batch`` end to end: a real command against an emulator in another process.

The crash tests kill the batch with SIGKILL at chosen points (rows journaled but not POSTed,
POSTs answered by nothing, downloads half done), rerun the same command, and judge by the
emulator's ground truth: one task per row, every row done, every file hashing to what the
server made, nothing partial left behind. Points are reached by the emulator's knobs (slow
tasks, stalled replies, trickled files), not by sleeping and hoping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .cli_helpers import (
    KEY,
    EmulatorProcess,
    assert_complete,
    batch_command,
    check_no_key,
    child_env,
    cli_process,
    created_for,
    finish,
    journal_rows,
    kill_when,
    leftovers,
    run_cli,
    run_main,
    sha256_file,
    wait_for,
    write_prompts,
)

ROOT = Path(__file__).resolve().parent.parent


# --- the README command ---------------------------------------------------------------------


def test_readme_command_makes_the_example_clips_with_the_builtin_emulator(tmp_path: Path) -> None:
    out = tmp_path / "clips"
    result = run_cli(["batch", "examples/prompts.txt", "--out", str(out), "--emulator"])
    assert result.code == 0, result.err
    prompts = [
        line for line in (ROOT / "examples" / "prompts.txt").read_text().splitlines() if line
    ]
    assert 10 <= len(prompts) <= 15
    clips = sorted(out.glob("*.mp4"))
    assert len(clips) == len(prompts)
    assert clips[0].name.startswith("001-a-red-fox")
    assert all(clip.read_bytes()[4:8] == b"ftyp" for clip in clips)
    summary = json.loads((out / "summary.json").read_text())
    assert {row["status"] for row in summary["rows"]} == {"done"}
    assert "12 done" in result.out
    # Rerunning a finished batch sends nothing and changes nothing.
    again = run_main(["batch", str(ROOT / "examples/prompts.txt"), "--out", str(out), "--emulator"])
    assert again.code == 0, again.err
    assert "submitted" not in again.out
    assert sorted(out.glob("*.mp4")) == clips


# --- kill -9 and rerun ----------------------------------------------------------------------


def test_kill_before_posts_then_rerun_submits_each_row_once(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    """One slot, slow tasks: rows 2-4 are provably journaled and not POSTed at the kill."""
    prompts = write_prompts(tmp_path / "p.txt", 4)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server, "--max-active", "1")
    server.configure(median_duration=300)  # 0.6 s: row 1 holds the only slot meanwhile
    batch = cli_process(command)
    kill_when(batch, lambda: sum(created_for(server, journal_rows(out))) >= 1)

    rows = journal_rows(out)
    assert len(rows) == 4  # every row was on disk before the first POST
    assert created_for(server, rows)[1:] == [0, 0, 0]
    assert [row["status"] for row in rows[1:]] == ["pending"] * 3

    server.configure(median_duration=90)
    result = run_cli(command)
    assert result.code == 0, result.err
    assert_complete(server, out, 4)


def test_kill_after_posts_before_any_reply_then_rerun_adopts_the_tasks(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    """Every create is committed and its reply stalls: the kill lands after the POSTs and
    before a single task_id reached the journal. The rerun must find all four by external id."""
    prompts = write_prompts(tmp_path / "p.txt", 4)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.faults({"create": {"STALL_AFTER_COMMIT": 1.0}, "stall_seconds": 5})
    batch = cli_process(command)
    kill_when(batch, lambda: created_for(server, journal_rows(out)) == [1, 1, 1, 1])

    rows = journal_rows(out)
    assert [row["task_id"] for row in rows] == [None] * 4
    assert [row["status"] for row in rows] == ["pending"] * 4

    server.faults(None)
    result = run_cli(command)
    assert result.code == 0, result.err
    assert_complete(server, out, 4)
    assert server.stats()["requests_per_route"]["get_by_external_id"] >= 4


def test_kill_mid_download_then_rerun_leaves_no_partial_file(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.configure(download_rate=1000)  # 2-8 KiB files: seconds each
    batch = cli_process(command)
    kill_when(batch, lambda: out.is_dir() and any(".part" in p.name for p in out.iterdir()))

    assert leftovers(out), "the kill was meant to land mid-download"
    assert not list(out.glob("*.mp4")), "no clip may look complete after a cut download"

    server.configure(download_rate=None)
    result = run_cli(command)
    assert result.code == 0, result.err
    assert_complete(server, out, 3)


def all_have_task_ids(out: Path) -> bool:
    rows = journal_rows(out)
    return bool(rows) and all(row["task_id"] for row in rows)


def test_kill_while_tasks_run_then_rerun_follows_them_by_task_id(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.configure(median_duration=400)
    batch = cli_process(command)
    kill_when(batch, lambda: all_have_task_ids(out))

    server.configure(median_duration=90)
    creates = server.stats()["requests_per_route"]["create"]
    result = run_cli(command)
    assert result.code == 0, result.err
    assert server.stats()["requests_per_route"]["create"] == creates  # followed, not resent
    assert_complete(server, out, 3)


# --- Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_stops_cleanly_keeps_the_journal_and_says_how_to_resume(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server, "--max-active", "1")
    server.configure(median_duration=400)
    batch = cli_process(command)
    wait_for(lambda: any(row["task_id"] for row in journal_rows(out)))
    batch.send_signal(signal.SIGINT)
    result = finish(batch, timeout=20)
    assert result.code == 130
    assert "interrupted; rerun the same command to resume" in result.err
    assert "Traceback" not in result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    rows = journal_rows(out)
    assert len(rows) == 3
    assert rows[0]["task_id"] is not None

    server.configure(median_duration=90)
    again = run_cli(command)
    assert again.code == 0, again.err
    assert_complete(server, out, 3)


# --- exit statuses (in this process from here on: the same code, without the start-up) -------


def test_failed_tasks_exit_1_are_not_resubmitted_and_retry_failed_retries_them(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.configure(failure_rate=1.0)
    result = run_main(command)
    assert result.code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["failed", "failed"]
    assert all(row["error"] == "Video generation failed" for row in summary["rows"])

    creates = server.stats()["requests_per_route"]["create"]
    again = run_main(command)
    assert again.code == 1
    assert server.stats()["requests_per_route"]["create"] == creates

    server.configure(failure_rate=0.0)
    retried = run_main([*command, "--retry-failed"])
    assert retried.code == 0, retried.err
    rows = assert_complete(server, out, 2)
    assert all(row["external_task_id"].endswith("-a2") for row in rows)


def test_account_error_exits_3_and_a_rerun_resumes(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.configure(account_error=1102)
    result = run_main(command)
    assert result.code == 3
    assert "account" in result.err
    assert "rerun the same command" in result.err
    assert created_for(server, journal_rows(out)) == [0, 0, 0]

    server.configure(account_error=None)
    again = run_main(command)
    assert again.code == 0, again.err
    assert_complete(server, out, 3)


def test_a_wrong_key_exits_3_without_printing_either_key(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    wrong = "sk-wrong-key-0123456789abcdef"
    result = run_main(batch_command(prompts, tmp_path / "out", server), key=wrong)
    assert result.code == 3
    assert wrong not in result.text
    assert "check the API key" in result.err


# --- input and usage errors: exit 2, nothing sent ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.txt", "a fine prompt\n\n" + "x" * 501 + "\n", [":3: prompt=", "at most 500"]),
        (
            "bad.jsonl",
            '{"prompt": "ok"}\n{"prompt": "cut\n{"prompt": "p", "promt": 1}\n'
            '{"prompt": "p", "duration": 7}\n[1]\n',
            [
                ":2: not valid JSON",
                ":3: 'promt' is not a request field (did you mean prompt?)",
                ":4: duration='7' is invalid: kling-v1 accepts 5, 10 seconds",
                ":5: must be a JSON object",
            ],
        ),
        (
            "bad.csv",
            'prompt,cfg_scale,mode\n"multi\nline prompt",0.5,std\nfine,high,std\nok,0.5,turbo\n',
            [
                ":2: a quoted cell runs on to line 3 (a stray quote?)",
                ":4: cfg_scale='high' is invalid: must be a number",
                ":5: mode='turbo'",
            ],
        ),
        ("header.csv", "promt,mode\nx,std\n", [":1: header: 'promt' is not a request field"]),
        ("empty.txt", "\n# only a comment\n\n", ["no prompts found"]),
        ("prompts.yaml", "prompt: x\n", ["unsupported file type '.yaml'"]),
    ],
)
def test_malformed_files_are_reported_by_line_and_nothing_is_sent(
    server: EmulatorProcess, tmp_path: Path, name: str, content: str, expected: list[str]
) -> None:
    prompts = tmp_path / name
    prompts.write_text(content)
    before = server.total_requests()
    result = run_main(batch_command(prompts, tmp_path / "out", server))
    assert result.code == 2
    assert "nothing was sent" in result.err
    for fragment in expected:
        assert fragment in result.err
    assert server.total_requests() == before
    assert not (tmp_path / "out").exists()


def test_dry_run_validates_prints_the_plan_and_sends_nothing(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox", "duration": 10, "mode": "pro"}\n{"prompt": "a cat"}\n')
    before = server.total_requests()
    result = run_main(batch_command(prompts, tmp_path / "out", server, "--dry-run"))
    assert result.code == 0, result.err
    assert "dry run: 2 rows" in result.out
    assert "2 submit" in result.out
    assert "pro" in result.out
    assert server.total_requests() == before
    assert not (tmp_path / "out").exists()


def test_missing_key_is_a_one_line_hint(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    result = run_main(["batch", str(prompts), "--out", str(tmp_path / "o")], key=None)
    assert result.code == 2
    assert result.err.strip().count("\n") == 0
    assert "KLING_API_KEY" in result.err
    assert "--emulator" in result.err


def test_api_key_flag_is_never_printed_even_after_a_typo(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    out = tmp_path / "out"
    typo = run_main(["batch", str(prompts), "--out", str(out), "--api-kye", KEY], key=None)
    assert typo.code == 2
    assert "--api-kye" in typo.err
    command = [*batch_command(prompts, out, server), "--api-key", KEY]
    result = run_main(command, key=None)
    assert result.code == 0, result.err
    check_no_key(
        (out / "summary.json").read_text(),
        (out / "kling-journal.sqlite3").read_bytes().decode("latin-1"),
    )


# --- journal semantics ------------------------------------------------------------------------


def test_a_changed_row_with_its_own_id_is_reported_not_resubmitted(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "first"}\n{"prompt": "second", "external_task_id": "changed-own-2"}\n'
    )
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    creates = server.stats()["requests_per_route"]["create"]
    prompts.write_text(
        '{"prompt": "first"}\n{"prompt": "a different second", "external_task_id": '
        '"changed-own-2"}\n{"prompt": "an appended third prompt"}\n'
    )
    result = run_main(command)
    assert result.code == 1
    assert "row 2 (line 2) has external_task_id 'changed-own-2', which an earlier run" in result.err
    summary = json.loads((out / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["done", "changed", "done"]
    assert server.stats()["requests_per_route"]["create"] == creates + 1  # only the new row


def test_an_expired_url_is_refreshed_when_a_lost_file_is_downloaded_again(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    first = journal_rows(out)[0]
    (out / first["file"]).unlink()
    server.configure(url_ttl=10)  # the journaled, unsigned URL now answers 403
    gets = server.stats()["requests_per_route"]["get"]
    result = run_main(command)
    assert result.code == 0, result.err
    assert server.stats()["requests_per_route"]["get"] > gets
    rows = assert_complete(server, out, 2)
    assert rows[0]["video_url"] != first["video_url"]
    assert sha256_file(out / first["file"]) == first["sha256"]


def test_a_download_that_keeps_failing_is_an_error_a_rerun_retries(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    server.faults({"download": {"ERROR_5XX_BEFORE_COMMIT": 1.0}})
    result = run_main(command)
    assert result.code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["error", "error"]
    assert "download" in summary["rows"][0]["error"]
    assert server.stats()["requests_per_route"]["download"] >= 2 * 6  # retried with backoff
    assert [row["status"] for row in journal_rows(out)] == ["succeeded", "succeeded"]
    assert leftovers(out) == []

    server.faults(None)
    creates = server.stats()["requests_per_route"]["create"]
    again = run_main(command)
    assert again.code == 0, again.err
    assert server.stats()["requests_per_route"]["create"] == creates
    assert_complete(server, out, 2)


def test_status_reports_the_journal_per_state(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    server.configure(failure_rate=1.0)
    assert run_main(batch_command(prompts, out, server)).code == 1
    result = run_main(["status", str(out)])
    assert result.code == 0, result.err
    assert "failed" in result.out
    assert "Video generation failed" in result.out
    missing = run_main(["status", str(tmp_path / "nowhere")])
    assert missing.code == 2
    assert "no journal" in missing.err  # errors go to stderr
    assert missing.out == ""


def test_live_progress_renders_and_finishes(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    command = [*batch_command(prompts, tmp_path / "out", server), "--progress", "live"]
    result = run_main(command)
    assert result.code == 0, result.err
    assert "ETA" in result.out
    assert "3 done" in result.out


def test_with_the_builtin_emulator_a_rerun_finds_its_tasks_again(tmp_path: Path) -> None:
    """The built-in emulator keeps its tasks in the out dir: a rerun downloads a lost file
    again from the same task, as against a real account, and creates nothing."""
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = ["batch", str(prompts), "--out", str(out), "--emulator", "--time-scale", "0.002"]
    assert run_main(command, key=None).code == 0
    first, second, third = journal_rows(out)
    (out / first["file"]).unlink()
    result = run_main(command, key=None)
    assert result.code == 0, result.err
    again = journal_rows(out)
    assert [(row["external_task_id"], row["task_id"]) for row in again] == [
        (row["external_task_id"], row["task_id"]) for row in (first, second, third)
    ]
    assert [row["attempt"] for row in again] == [1, 1, 1]
    assert [row["status"] for row in again] == ["done"] * 3
    assert sha256_file(out / first["file"]) == first["sha256"]
    assert leftovers(out) == []


def test_the_emulator_command_prints_its_url_and_key_and_exits_0_on_ctrl_c() -> None:
    process = cli_process(["emulator", "--port", "0", "--time-scale", "0.001"])
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(2)]
    assert lines[0].startswith("url=http://127.0.0.1:")
    assert lines[1].startswith("api_key=")
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode == 0


# --- usage errors name the subcommand; the emulator needs no rich ---------------------------


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["batch", "--bogus"], "usage: kling-async batch PROMPTS --out DIR [options]"),
        (["batch", "p.txt", "--out", "o", "--bogus=1"], "usage: kling-async batch PROMPTS"),
        (["batch", "p.txt", "--out", "o", "--mode", "fast"], "usage: kling-async batch PROMPTS"),
        (["status", "--bogus"], "usage: kling-async status DIR [--journal PATH] [--json]"),
        (["status"], "usage: kling-async status DIR"),
        (["bogus"], "usage: kling-async [--version] {batch,status,emulator} ..."),
    ],
)
def test_a_bad_flag_prints_the_usage_of_its_subcommand(argv: list[str], usage: str) -> None:
    result = run_main(argv)
    assert result.code == 2, result.text
    assert result.out == ""
    first, error = result.err.splitlines()
    assert first.startswith(usage), result.err
    command = " ".join(["kling-async", *argv[:1]]) if argv[0] != "bogus" else "kling-async"
    assert error.startswith(f"{command}: error: "), error
    assert error.endswith(f"(see {command} --help)"), error


@pytest.mark.parametrize("argv", [["--bogus"], ["--json", "batch", "p.txt"], [f"--api-key={KEY}"]])
def test_an_option_before_the_subcommand_is_named(argv: list[str]) -> None:
    """An option given before the subcommand was reported as a missing subcommand (or as
    the subcommand's own unknown argument); it is named, never with its value."""
    result = run_main(argv)
    assert result.code == 2, result.text
    assert result.out == ""
    option = argv[0].partition("=")[0]
    assert f"unrecognized option {option}: a subcommand's options go after it" in result.err
    assert "required" not in result.err
    assert KEY not in result.err


def test_an_unknown_option_is_named_before_missing_arguments() -> None:
    result = run_main(["batch", "--bogus", "--api-kye", KEY])
    assert result.code == 2
    assert "unrecognized arguments: --bogus --api-kye" in result.err
    assert "required" not in result.err


#: Runs the command line with rich unimportable (as without the [cli] extra): a finder first
#: in sys.meta_path refuses it.
NO_RICH = """
import sys

class NoRich:
    def find_spec(self, name, path=None, target=None):
        if name == "rich" or name.startswith("rich."):
            raise ImportError("No module named 'rich' (blocked by the test)")
        return None

sys.meta_path.insert(0, NoRich())
from kling_async.cli import main
code = main(sys.argv[1:])
assert not any(name == "rich" or name.startswith("rich.") for name in sys.modules)
raise SystemExit(code)
"""


def without_rich(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", NO_RICH, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(KLING_API_KEY=KEY),
        cwd=ROOT,
    )


def test_the_emulator_serves_without_rich() -> None:
    process = without_rich("emulator", "--time-scale", "0.01", "--api-key", "sk-no-rich-1")
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("url=http://127.0.0.1:"), url
        request = urllib.request.Request(  # noqa: S310 (the loopback URL it printed)
            url.removeprefix("url=") + "/v1/videos/text2video",
            data=json.dumps({"prompt": "a fox"}).encode(),
            headers={"Authorization": "Bearer sk-no-rich-1", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            answer = json.loads(response.read())
        assert answer["code"] == 0 and answer["data"]["task_id"]
    finally:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        (["--help"], 0, "usage: kling-async"),
        (["--version"], 0, "kling-async "),
        (["batch", "--help"], 0, "usage: kling-async batch PROMPTS --out DIR [options]"),
        (["status", "--help"], 0, "usage: kling-async status DIR"),
        (["emulator", "--help"], 0, "usage: kling-async emulator"),
        (["batch", "--bogus"], 2, "usage: kling-async batch PROMPTS --out DIR [options]"),
        (["emulator", "--bogus"], 2, "usage: kling-async emulator"),
        (["batch", "p.txt", "--out", "o"], 2, "kling-async batch: needs the cli extra (rich): pip"),
        (["status", "o"], 2, "kling-async status: needs the cli extra (rich): pip install"),
    ],
)
def test_help_usage_and_a_clear_refusal_without_rich(
    argv: list[str], code: int, expected: str
) -> None:
    process = without_rich(*argv)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, out + err
    assert expected in out + err
    assert "Traceback" not in err
