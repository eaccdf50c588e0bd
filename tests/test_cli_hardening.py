"""``kling-async batch`` under hostile input and a hostile out directory: stray CSV quotes,
deep JSON, absurd flag values, terminal escapes in prompts and errors, planted symbolic links,
a full disk, keys glued to options, two journals on one directory, rows that move, bad base
URLs, and an account error on every row.

Everything runs against the emulator in another process (``cli_helpers``), or the built-in one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import kling_async as ka
from kling_async.cli._journal import Journal, JournalRow
from kling_async.cli._progress import LiveProgress, PlainProgress
from kling_async.cli._prompts import FIELDS, Defaults, PromptFileError, load_prompts
from kling_async.cli._rows import Phase, RowState

from .cli_helpers import (
    EmulatorProcess,
    assert_complete,
    batch_command,
    cli_process,
    created_for,
    journal_rows,
    leftovers,
    run_main,
    sha256_file,
    wait_for,
    write_prompts,
)


def creates(emu: EmulatorProcess) -> int:
    count: int = emu.stats()["requests_per_route"].get("create", 0)
    return count


# --- 1. CSV: a stray quote never merges rows ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # One column: row 3 opens a quote that never closes and swallows rows 4 and 5.
        ('prompt\nfirst\n"second, unclosed\nthird\nfourth\n', "3: a quoted cell runs on to line 5"),
        # Closed further down: still two physical lines merged into one cell.
        (
            'prompt,mode\nok,std\n"a quoted\nprompt",std\nlast,std\n',
            "3: a quoted cell runs on to line 4",
        ),
        # Opened on the last line, with or without a final newline.
        ('prompt,mode\nok,std\nfine "but,std\n"then,std\n', "4: a quoted cell is never closed"),
        ('prompt\nok\n"then', "3: a quoted cell is never closed"),
        # Text after a closing quote.
        ('prompt,mode\n"a"b,std\n', "2: not valid CSV: ',' expected after '\"'"),
    ],
)
def test_a_stray_csv_quote_is_an_error_naming_the_lines(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, Defaults(), ka.COMETAPI)
    report = caught.value.describe()
    assert f"p.csv:{expected}" in report
    assert "(a stray quote?)" in report


def test_a_stray_csv_quote_sends_nothing(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text('prompt\nfirst\n"second, unclosed\nthird\nfourth\n')
    before = server.total_requests()
    result = run_main(batch_command(prompts, tmp_path / "out", server))
    assert result.code == 2, result.text
    assert "p.csv:3: a quoted cell runs on to line 5 (a stray quote?)" in result.err
    assert server.total_requests() == before
    assert not (tmp_path / "out").exists()


# --- 2. deep nesting and out-of-range flags: one line, never a traceback ------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("deep.jsonl", "[" * DEEP + "\n"),
        ("deep-extra.jsonl", '{"prompt": "p", "extra": {"x": ' + "[" * DEEP + "}}\n"),
        ("deep-extra-ok.jsonl", '{"prompt": "p", "extra": {"x": ' + "[" * 500 + "]" * 500 + "}}\n"),
        ("deep-camera.csv", "prompt,camera_control\np," + "[" * DEEP + "\n"),
        ("deep-extra.csv", 'prompt,extra\np,"{""x"": ' + "[" * 900 + "]" * 900 + '}"\n'),
        ("huge-number.jsonl", '{"prompt": "p", "duration": ' + "9" * 5000 + "}\n"),
        ("surrogate.jsonl", '{"prompt": "bad \\ud800 text"}\n'),
    ],
)
def test_hostile_json_is_a_problem_on_its_line_not_a_traceback(
    tmp_path: Path, name: str, content: str
) -> None:
    prompts = tmp_path / name
    prompts.write_text(content)
    result = run_main(["batch", str(prompts), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.code == 2, result.text
    assert "Traceback" not in result.text
    line = 2 if name.endswith(".csv") else 1  # under the header
    assert f"{name}:{line}: " in result.err
    assert len(result.err) < 2000


@pytest.mark.parametrize(
    "flag",
    [
        ["--max-file-size", "1e400"],
        ["--max-file-size", "nan"],
        ["--max-file-size", "99999999999999999999T"],
        ["--max-file-size", "9" * 5000],
        ["--time-scale", "1e400"],
        ["--time-scale", "nan"],
        ["--time-scale", "1e300"],
        ["--time-scale", "1e-300"],
        ["--max-active", "99999999999999999999999999"],
        ["--max-active", "9" * 5000],
        ["--max-downloads", "99999999999999999999999999"],
    ],
)
def test_out_of_range_flags_are_one_line_errors(tmp_path: Path, flag: list[str]) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    out = tmp_path / "o"
    result = run_main(["batch", str(prompts), "--out", str(out), "--emulator", *flag])
    assert result.code == 2, result.text
    assert "Traceback" not in result.text
    # The usage of batch, then one line naming the option and the rule (never the value).
    usage, error = result.err.strip().splitlines()
    assert usage == "usage: kling-async batch PROMPTS --out DIR [options]"
    assert f"argument {flag[0]}: must be" in error
    assert len(error) < 300
    assert not out.exists()


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from([*FIELDS, "x", "promt", ""]) | st.text(max_size=8), children
        )
    ),
    max_leaves=20,
)
_NOISE = st.text(
    alphabet=st.sampled_from(list("abc ,\"'\n\r\t\\{}[]:#\x00\x1b\u202e\ufeff0123456789.-e")),
    max_size=200,
)


#: Openers of nested JSON, with what closes one (after a final scalar, for objects).
_NESTING = {"[": "]", '{"a": ': "}", '{"prompt": "p", "extra": {"x": ': "}}"}


@st.composite
def prompt_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """Any file of any format: structured rows, noise, deep nesting, raw bytes."""
    suffix = draw(st.sampled_from([".txt", ".jsonl", ".csv"]))
    kind = draw(st.sampled_from(["rows", "noise", "deep", "bytes"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=300))
    if kind == "noise":
        return suffix, draw(_NOISE).encode("utf-8", "surrogatepass")
    if kind == "deep":
        depth = draw(st.integers(1, 5000))
        opener = draw(st.sampled_from(sorted(_NESTING)))
        closed = draw(st.booleans())
        value = opener * depth
        if closed:
            value += ("" if opener == "[" else "1") + _NESTING[opener] * depth
        if suffix == ".csv":
            cell = '"' + value.replace('"', '""') + '"'
            return (
                suffix,
                f"prompt,{draw(st.sampled_from(['extra', 'camera_control']))}\np,{cell}\n".encode(),
            )
        return suffix, (value + "\n").encode()
    rows = draw(st.lists(_JSON_VALUES, max_size=6))
    if suffix == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    elif suffix == ".csv":
        columns = draw(st.lists(st.sampled_from([*FIELDS, "x"]), min_size=1, max_size=4))
        cells = [
            ",".join(draw(st.sampled_from([json.dumps(row), str(row), '"', ""])) for _ in columns)
            for row in rows
        ]
        text = ",".join(columns) + "\n" + "\n".join(cells) + "\n"
    else:
        text = "\n".join(str(row) for row in rows)
    return suffix, text.encode("utf-8", "surrogatepass")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(prompt_files(), st.sampled_from([ka.COMETAPI, ka.OFFICIAL]))
def test_the_loader_raises_nothing_but_its_own_error(
    tmp_path: Path, generated: tuple[str, bytes], profile: ka.BackendProfile
) -> None:
    suffix, data = generated
    path = tmp_path / f"generated{suffix}"
    path.write_bytes(data)
    try:
        loaded = load_prompts(path, Defaults(), profile)
    except PromptFileError as exc:
        assert exc.problems
        exc.describe()
        return
    for row in loaded.rows:
        # What the journal stores must be encodable and hashable.
        row.request_json.encode()
        assert row.key


# --- 3. control characters and markup are shown, never obeyed -----------------------------------

HOSTILE = (
    "fox \x1b]8;;http://evil.example\x07osc\x1b]8;;\x07 \x1b[38;5;201mpink \x9b2J \x7f "
    "\u202egnp.exe\u2066 [bold]B[/bold] [link=http://evil.example]L[/link] :cat:"
)
RAW = ("\x1b]8;;http://evil", "\x1b[38;5;201m", "\x9b", "\x7f", "\u202e", "\u2066", "\x07")


def assert_shown_not_obeyed(text: str) -> None:
    for raw in RAW:
        assert raw not in text, f"{raw!r} reached the output raw"
    assert "\x1b]8;" not in text, "a hyperlink was emitted"
    assert "\\x1b[38;5;201m" in text
    assert "\\u202e" in text
    assert "[bold]B[/bold]" in text


def test_printable_escapes_c0_c1_del_and_bidi_and_nothing_else() -> None:
    from kling_async.cli._display import printable

    assert printable("a\x1bb\x9bc\x7fd\u202ee\u2066f\x00g") == (
        "a\\x1bb\\x9bc\\x7fd\\u202ee\\u2066f\\x00g"
    )
    ordinary = "Ünïcödé 日本語 emoji 🦊‍🔥 tab-free [bold] :cat: \\ back"
    assert printable(ordinary) == ordinary
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F)]:
        assert unicodedata.category(printable(chr(code))[0]) != "Cc"
        assert printable(chr(code)).startswith("\\")


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")


def hostile_prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": HOSTILE}) + "\n" + '{"prompt": "a calm sea"}\n')
    return prompts


@pytest.mark.usefixtures("wide")
def test_hostile_prompts_are_escaped_in_the_plan_and_the_live_view(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = hostile_prompts(tmp_path)
    out = tmp_path / "out"
    plan = run_main(batch_command(prompts, out, server, "--dry-run"))
    assert plan.code == 0, plan.text
    assert_shown_not_obeyed(plan.out)
    server.configure(median_duration=600)  # 1.2 s: the live view draws the active rows
    live = run_main(
        [*batch_command(prompts, out, server, "--max-active", "1"), "--progress", "live"]
    )
    assert live.code == 0, live.text
    for raw in RAW:  # what the live view draws is checked in the test below
        assert raw not in live.out, f"{raw!r} reached the live view raw"


@pytest.mark.usefixtures("wide")
def test_journal_errors_are_escaped_in_the_summary_and_in_status(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = hostile_prompts(tmp_path)
    out = tmp_path / "out"
    server.configure(failure_rate=1.0)
    assert run_main(batch_command(prompts, out, server)).code == 1
    with sqlite3.connect(out / "kling-journal.sqlite3") as db:
        db.execute("UPDATE rows SET error = ?", (HOSTILE,))
    again = run_main(batch_command(prompts, out, server))
    assert again.code == 1
    assert_shown_not_obeyed(again.text)
    status = run_main(["status", str(out)])
    assert status.code == 0
    assert_shown_not_obeyed(status.text)


def row_state(tmp_path: Path, prompt: str) -> RowState:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": prompt}) + "\n")
    [row] = load_prompts(path, Defaults(), ka.COMETAPI).rows
    record = JournalRow(
        key=row.key,
        number=1,
        line=1,
        request_hash=row.request_hash,
        request_json=row.request_json,
        external_task_id="kb-x-1",
        attempt=1,
        task_id=None,
        status="pending",
        video_id=None,
        video_url=None,
        file="001-x.mp4",
        sha256=None,
        size=None,
        error=None,
        submitted_at=None,
        finished_at=None,
    )
    return RowState(row, record, Phase.WAITING)


def test_plain_and_live_progress_escape_server_text(tmp_path: Path) -> None:
    state = row_state(tmp_path, HOSTILE)
    state.task_id = "t\x1b[38;5;201m"
    plain = io.StringIO()
    progress = PlainProgress(plain)
    progress.attach([state], lambda: None)  # type: ignore[arg-type,return-value]
    state.move(Phase.ERROR)
    progress.changed(state, f"error: {HOSTILE}")
    progress.note(f"stopping submissions: {HOSTILE}")
    assert_shown_not_obeyed(plain.getvalue())

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=400)
    live = LiveProgress(console)
    live.note(HOSTILE)
    live.changed(state, f"error: {HOSTILE}")
    assert_shown_not_obeyed(screen.getvalue())

    # The table of active rows: the prompt's start (60 characters) and the task id.
    drawn = io.StringIO()
    view = LiveProgress(Console(file=drawn, force_terminal=True, width=400))
    state.move(Phase.PROCESSING)
    stats = SimpleNamespace(active=1, active_limit=4.0, requests=2)
    view.attach([state], lambda: stats)  # type: ignore[arg-type,return-value]
    view.close()
    for raw in RAW:
        assert raw not in drawn.getvalue(), f"{raw!r} reached the live view raw"
    assert "fox \\x1b]8;;http://evil.example\\x07osc" in drawn.getvalue()
    assert "t\\x1b[38;5;201m" in drawn.getvalue()


def test_verbose_log_lines_are_escaped_too() -> None:
    from kling_async.cli._app import _log_to_stderr

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), _log_to_stderr(verbose=True):
        logging.getLogger("kling_async").info("server said: %s", HOSTILE)
    assert_shown_not_obeyed(stderr.getvalue())


# --- 4. no write follows a planted link ----------------------------------------------------------


def emulator_batch(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", str(prompts), "--out", str(out), "--emulator", "--time-scale", "0.002", *extra]


def test_summary_writes_follow_no_planted_link(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".summary.json.tmp").symlink_to(victim)
    (out / "summary.json").symlink_to(victim)
    result = run_main(emulator_batch(prompts, out), key=None)
    assert result.code == 0, result.text
    assert victim.read_text() == "precious"
    assert not (out / "summary.json").is_symlink()
    assert json.loads((out / "summary.json").read_text())["counts"] == {"done": 1}
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == [".summary.json.tmp"]


@pytest.mark.parametrize(
    "name",
    [
        "kling-journal.sqlite3",
        "kling-journal.sqlite3-wal",
        "kling-journal.sqlite3-shm",
        "kling-journal.sqlite3.lock",
        ".kling-batch.lock",
    ],
)
def test_a_link_planted_at_a_journal_or_lock_name_is_refused(tmp_path: Path, name: str) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out / name).symlink_to(victim)
    result = run_main(emulator_batch(prompts, out), key=None)
    assert result.code == 2, result.text
    assert f"{out / name} is a symbolic link" in result.err
    assert result.err.strip().count("\n") == 0
    assert victim.read_bytes() == b"precious"


def test_new_files_are_created_exclusively_without_following_links(tmp_path: Path) -> None:
    from kling_async.cli import _files

    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "target.json"
    target.symlink_to(victim)
    _files.replace_file(target, b"new\n")
    assert victim.read_text() == "precious"
    assert target.read_bytes() == b"new\n"
    assert not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.json", "victim"]


# --- 5. a full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` at ``path`` if this process may mount (root), else False."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(  # noqa: S603
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],  # noqa: S607
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)  # noqa: S603,S607


def test_a_full_disk_is_reported_as_such_exits_1_and_a_rerun_bills_nothing_twice(
    server: EmulatorProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two paths, and the test says which ran: a real 512 KiB tmpfs filled by a filler file
    when this process may mount one (root), else an ENOSPC injected at our own seams (the
    journal's transactions and our file writes)."""
    from kling_async.cli import _files

    prompts = write_prompts(tmp_path / "p.txt", 12)
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "512k") as mounted:
        out = disk / "out"
        command = batch_command(prompts, out, server)
        filler = disk / "filler"
        if mounted:
            path = "tmpfs"
            out.mkdir()
            # Leave 142 KiB: room to open the journal, its job store's tables and journal
            # every row (about 115 KiB with its WAL and shared-memory files), not for the
            # run's updates and clips.
            filler.write_bytes(b"\0" * (370 * 1024))
        else:
            path = "injected ENOSPC"
            calls = {"apply": 0}
            real_apply = Journal.apply

            def failing_apply(self: Any, updates: Any) -> None:
                calls["apply"] += 1
                if calls["apply"] > 2:
                    error = sqlite3.OperationalError("database or disk is full")
                    error.sqlite_errorcode = sqlite3.SQLITE_FULL
                    raise error
                real_apply(self, updates)

            def failing_write(fd: int, data: bytes) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr("kling_async.cli._journal.Journal.apply", failing_apply)
            monkeypatch.setattr(_files, "_write", failing_write)
        print(f"disk-full path: {path}")  # shown with -rP: which path ran
        result = run_main(command)
        assert result.code == 1, (path, result.text)
        assert f"no space left on the device holding {out}" in result.err, path
        assert "Traceback" not in result.text, path
        assert leftovers(out) == [], path
        assert sum(created_for(server, journal_rows(out))) >= 1, path  # tasks were created
        assert all(p.stat().st_size > 0 for p in out.iterdir() if p.suffix == ".mp4"), path
        if (out / "summary.json").exists():
            json.loads((out / "summary.json").read_text())  # complete, never cut
        if mounted:
            filler.unlink()
        else:
            monkeypatch.undo()
        again = run_main(command)
        assert again.code == 0, (path, again.text)
        assert_complete(server, out, 12)


def test_a_clip_that_finds_the_disk_full_is_an_error_row_said_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download's own ENOSPC (injected where the client writes the file): the row ends in
    error, the run says the disk is full once and exits 1; a rerun downloads the clip."""

    async def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(ka.KlingClient, "download", no_space)
        result = run_main(emulator_batch(prompts, out), key=None)
    assert result.code == 1, result.text
    assert result.err.count(f"no space left on the device holding {out}: clips") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [row["error"] for row in summary["rows"]] == [
        f"download failed: no space left on the device holding {out}"
    ] * 2
    assert run_main(emulator_batch(prompts, out), key=None).code == 0


# --- 6. keys glued to options are never echoed ---------------------------------------------------

LIKE_A_KEY = "sk-live-9d8c7b6a5f4e3d2c"


@pytest.mark.parametrize(
    "args",
    [
        ["-a" + LIKE_A_KEY],
        ["-" + LIKE_A_KEY],
        ["-v" + LIKE_A_KEY],
        ["--verbose=" + LIKE_A_KEY],
        ["--emulator=" + LIKE_A_KEY],
        ["--api-kye" + LIKE_A_KEY],
        ["--mode", LIKE_A_KEY],
        ["--progress", LIKE_A_KEY],
        ["--max-active", LIKE_A_KEY],
        ["--max-downloads", LIKE_A_KEY],
        ["--max-file-size", LIKE_A_KEY],
        ["--time-scale", LIKE_A_KEY],
        [LIKE_A_KEY],
    ],
)
def test_no_argparse_error_echoes_a_value(tmp_path: Path, args: list[str]) -> None:
    result = run_main(["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), *args])
    assert result.code == 2, result.text
    assert "9d8c7b6a" not in result.text
    assert "live-9d8c" not in result.text
    assert "error:" in result.err


@pytest.mark.parametrize(
    "args", [[LIKE_A_KEY], ["-a" + LIKE_A_KEY, "batch"], ["status", "d", "-x" + LIKE_A_KEY]]
)
def test_no_top_level_or_status_error_echoes_a_value(args: list[str]) -> None:
    result = run_main(args)
    assert result.code == 2, result.text
    assert "9d8c7b6a" not in result.text


# --- 7. one batch per out directory --------------------------------------------------------------


def test_a_second_journal_on_the_same_out_is_refused_while_a_batch_runs(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    server.configure(median_duration=600)
    first = cli_process(batch_command(prompts, out, server))
    try:
        wait_for(lambda: any(row["task_id"] for row in journal_rows(out)))
        second = run_main(
            [*batch_command(prompts, out, server), "--journal", str(tmp_path / "other.sqlite3")]
        )
    finally:
        first.kill()
        first.communicate(timeout=10)
    assert second.code == 2, second.text
    assert f"another kling-async batch is using {out}" in second.err
    assert not (tmp_path / "other.sqlite3").exists()


# --- 8. rows are who they are, not where they are ------------------------------------------------


def test_inserting_a_line_at_the_top_bills_no_row_again(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    first = {row["external_task_id"]: row for row in journal_rows(out)}
    before = creates(server)
    prompts.write_text("a brand new first prompt\n" + prompts.read_text())
    result = run_main(command)
    assert result.code == 0, result.text
    assert creates(server) == before + 1
    rows = assert_complete(server, out, 4)
    by_id = {row["external_task_id"]: row for row in rows}
    for external, earlier in first.items():
        assert by_id[external]["number"] == earlier["number"] + 1  # follows the file
        assert by_id[external]["line"] == earlier["line"] + 1
        assert by_id[external]["file"] == earlier["file"]
        assert sha256_file(out / earlier["file"]) == earlier["sha256"]
    assert len({row["file"] for row in rows}) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["row"] for entry in summary["rows"]] == [1, 2, 3, 4]


def test_identical_prompts_are_rows_of_their_own(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("the same sea\nthe same sea\nanother sea\n")
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    assert_complete(server, out, 3)
    before = creates(server)
    assert run_main(command).code == 0
    assert creates(server) == before


def test_an_edited_row_is_a_new_row_and_its_old_version_is_reported_gone(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Fox at dawn\nsecond\n")
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    [old, second] = journal_rows(out)
    earlier = {old["external_task_id"], second["external_task_id"]}
    before = creates(server)
    prompts.write_text("fox at dawn!\nsecond\n")  # same slug, same row number: another request
    result = run_main(command)
    assert result.code == 0, result.text
    assert creates(server) == before + 1
    assert "1 row the file no longer has" in result.text
    rows = journal_rows(out)
    assert len(rows) == 3
    [new] = [row for row in rows if row["external_task_id"] not in earlier]
    assert len({row["external_task_id"] for row in rows}) == 3
    assert len({row["file"] for row in rows}) == 3
    assert sha256_file(out / old["file"]) == old["sha256"]  # the earlier clip is kept
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["status"] for entry in summary["rows"]] == ["done", "done"]
    assert new["status"] == "done"


def test_a_row_with_its_own_id_whose_request_changed_is_not_sent(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "external_task_id": "mine"}\n{"prompt": "b"}\n')
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    before = creates(server)
    prompts.write_text('{"prompt": "A", "external_task_id": "mine"}\n{"prompt": "b"}\n')
    result = run_main(command)
    assert result.code == 1
    assert "external_task_id 'mine'" in result.err
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["status"] for entry in summary["rows"]] == ["changed", "done"]
    assert creates(server) == before


#: The rows table of schema 3 (and 2), which kept each job's state in the row.
LEGACY_ROWS = """
CREATE TABLE rows (
    row_key TEXT PRIMARY KEY, number INTEGER NOT NULL, line INTEGER NOT NULL,
    request_hash TEXT NOT NULL, request_json TEXT NOT NULL,
    external_task_id TEXT NOT NULL UNIQUE, attempt INTEGER NOT NULL DEFAULT 1, task_id TEXT,
    status TEXT NOT NULL, video_id TEXT, video_url TEXT, file TEXT NOT NULL, sha256 TEXT,
    size INTEGER, error TEXT, submitted_at REAL, finished_at REAL, updated_at REAL NOT NULL,
    possible_duplicate INTEGER NOT NULL DEFAULT 0
)
"""
LEGACY_COLUMNS = (
    "row_key, number, line, request_hash, request_json, external_task_id, attempt, task_id, "
    "status, video_id, video_url, file, sha256, size, error, submitted_at, finished_at, "
    "updated_at, possible_duplicate"
)


def make_legacy(out: Path, version: str) -> None:
    """Turn a journal into what an older version wrote, by hand: schema 3 kept each job's
    task id, status and flag in its row and had no job store tables; schema 2 and 1 also
    stored requests as their wire body (set fields only, extras merged) and hashed so;
    schema 2 keys rows by that hash, schema 1 by position and keeps no id counter."""
    rows = journal_rows(out)
    with contextlib.closing(sqlite3.connect(out / "kling-journal.sqlite3")) as db, db:
        for table in ("rows", "kling_jobs", "kling_jobs_meta"):
            db.execute(f"DROP TABLE {table}")
        db.execute(LEGACY_ROWS)
        names = [name.strip() for name in LEGACY_COLUMNS.split(",")]
        db.executemany(
            f"INSERT INTO rows ({LEGACY_COLUMNS}) VALUES ({', '.join('?' for _ in names)})",  # noqa: S608
            [tuple(row[name] for name in names) for row in rows],
        )
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    if version == "3":
        return
    occurrences: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(out / "kling-journal.sqlite3")) as db, db:
        stored_rows = db.execute("SELECT row_key, number, request_json FROM rows ORDER BY number")
        for key, number, stored in stored_rows.fetchall():
            record = json.loads(stored)
            body = {k: v for k, v in record.items() if v is not None and k != "extra"}
            body.update(record.get("extra") or {})
            encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            digest = hashlib.sha256(encoded.encode()).hexdigest()
            occurrences[digest] = occurrences.get(digest, 0) + 1
            new_key = key
            if not key.startswith("id:"):
                new_key = f"#{number}" if version == "1" else f"{digest}#{occurrences[digest]}"
            db.execute(
                "UPDATE rows SET row_key = ?, request_json = ?, request_hash = ? WHERE row_key = ?",
                (new_key, encoded, digest, key),
            )
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (version,))
        if version == "1":
            db.execute("DELETE FROM meta WHERE key = 'next_id'")


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_an_older_journal_is_migrated_and_nothing_is_billed_again(
    server: EmulatorProcess, tmp_path: Path, version: str
) -> None:
    prompts = tmp_path / "p.jsonl"
    own = f"mine-v{version}"  # one emulator serves the module: an id of its own per case
    prompts.write_text(
        f'{{"prompt": "same"}}\n{{"prompt": "own", "external_task_id": "{own}"}}\n'
        '{"prompt": "same"}\n'
    )
    out = tmp_path / "out"
    command = batch_command(prompts, out, server)
    assert run_main(command).code == 0
    make_legacy(out, version)

    plan = run_main([*command, "--dry-run"])
    assert "3 done (skip)" in plan.out, plan.out
    before = creates(server)
    prompts.write_text('{"prompt": "new on top"}\n' + prompts.read_text())
    result = run_main(command)
    assert result.code == 0, result.text
    assert creates(server) == before + 1
    rows = assert_complete(server, out, 4)
    batch = json.loads((out / "summary.json").read_text())["batch_id"]
    ids = [row["external_task_id"] for row in rows]
    assert ids == [f"kb-{batch}-4", f"kb-{batch}-1", own, f"kb-{batch}-3"]
    with contextlib.closing(sqlite3.connect(out / "kling-journal.sqlite3")) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        # The jobs' state lives in the job store's records now, every task id kept.
        columns = {info[1] for info in db.execute("PRAGMA table_info(rows)")}
        assert not columns & {"task_id", "status", "possible_duplicate"}
        held = dict(db.execute("SELECT id, task_id FROM kling_jobs"))
    assert all(held[row["external_task_id"]] == row["task_id"] for row in rows)


# --- 9. the base URL is checked before anything is written ---------------------------------------


@pytest.mark.parametrize("url", ["ftp://x", "http://", "not a url", "http://host:99999"])
@pytest.mark.parametrize("source", ["KLING_BASE_URL", "--base-url"])
def test_a_bad_base_url_is_a_usage_error_and_leaves_no_journal(
    tmp_path: Path, url: str, source: str
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 1)
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "--progress", "plain"]
    if source == "--base-url":
        result = run_main([*args, "--base-url", url])
    else:
        result = run_main(args, env={"KLING_BASE_URL": url})
    assert result.code == 2, result.text
    assert result.err.strip().count("\n") == 0, result.err
    assert source in result.err
    assert "base URL" in result.err
    assert not (out / "kling-journal.sqlite3").exists()


# --- 10. an account error on every row is said once, with a count --------------------------------


@pytest.mark.parametrize("progress", ["plain", "live"])
@pytest.mark.usefixtures("wide")
def test_a_rejected_key_is_reported_once_with_a_count(
    server: EmulatorProcess, tmp_path: Path, progress: str
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 6)
    out = tmp_path / "out"
    command = [*batch_command(prompts, out, server), "--progress", progress]
    result = run_main(command, key="sk-wrong-key-0123456789abcdef")
    assert result.code == 3, result.text
    assert result.text.count("stopping submissions:") == 1
    assert result.text.count("6 rows not sent:") == 1
    assert not re.search(r"row \d+: error", result.text), result.text
    table = [line for line in result.out.splitlines() if "│" in line and "not sent" in line]
    assert len(table) == 1, result.out
    assert "1-6" in table[0]
