"""Review of issue 12 (docs site, packaging, the batch tool at 500 rows): defects found, each
pinned by a test that failed before its fix.

The command-line tests run ``kling-async`` against the emulator in another process over real
loopback HTTP (``tests/cli_helpers.py``), as the other CLI tests do.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from . import test_docs_examples as docs_examples
from . import test_docs_reference as docs_reference
from .cli_helpers import (
    EmulatorProcess,
    batch_command,
    child_env,
    cli_process,
    run_cli,
    run_main,
    write_prompts,
)

#: A key the emulator does not know (it answers 401, code 1000): an account-level error.
WRONG_KEY = "sk-review12-not-a-known-key"


# --- 1. a rerun after an account-level error never ends ------------------------------------


@pytest.mark.timeout(90)
def test_a_rerun_after_a_rejected_key_stops_again(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    command = batch_command(prompts, out, server, "--json", progress=None)
    env = child_env(KLING_API_KEY=WRONG_KEY)
    first = run_cli(command, env=env)
    assert first.code == 3, first.text  # the account cannot create tasks
    lookups_before = server.stats()["requests_per_route"].get("get_by_external_id", 0)
    process = cli_process(command, env=env)
    try:
        out_text, err_text = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
        lookups = server.stats()["requests_per_route"].get("get_by_external_id", 0)
        pytest.fail(f"the rerun never ended ({lookups - lookups_before} lookups sent meanwhile)")
    assert process.returncode == 3, out_text + err_text
    assert [json.loads(line)["event"] for line in out_text.splitlines()][-1] == "summary"


# --- 2. status writes to what it reads, and takes any SQLite file for a journal ---------------


def test_status_leaves_a_file_that_is_not_a_journal_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "kling-journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.commit()
    before = path.read_bytes()
    result = run_main(["status", str(out), "--json"])
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master"))
    assert tables == ["invoices"], "status added tables to a file it only reads"
    assert path.read_bytes() == before, "status changed the file it only reads"
    assert result.code == 2, result.text
    assert result.out == ""
    assert "not a" in result.err and "journal" in result.err, result.err


def test_status_on_an_empty_file_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "kling-journal.sqlite3"
    path.write_bytes(b"")
    result = run_main(["status", str(out), "--json"])
    assert path.read_bytes() == b"", "status wrote to the file"
    assert result.code == 2, result.text
    assert result.out == ""


# --- 3. kling-async emulator: a port it cannot bind is a traceback ----------------------------


@pytest.mark.parametrize("reason", ["busy", "out of range"])
def test_the_emulator_says_why_it_cannot_listen(reason: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] if reason == "busy" else 99999
        result = run_cli(["emulator", "--port", str(port)], timeout=30)
    assert "Traceback" not in result.err, result.err
    assert result.code == 2, result.text
    assert str(port) in result.err


# --- 4. --dry-run --json: the plan object has no time ------------------------------------------


def test_the_plan_object_has_a_time(server: EmulatorProcess, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    command = [
        *batch_command(prompts, tmp_path / "out", server, "--json", progress=None),
        "--dry-run",
    ]
    result = run_main(command)
    assert result.code == 0, result.text
    [plan] = [json.loads(line) for line in result.out.splitlines()]
    assert plan["event"] == "plan"
    assert "time" in plan, plan


# --- 5. the docs' tests: blocks rendered as Python that never run -------------------------------


@pytest.mark.parametrize("fence", ["python3", "py3"])
def test_every_fence_rendered_as_python_is_run(
    fence: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "page.md").write_text(f"intro\n\n```{fence}\nraise RuntimeError('x')\n```\n")
    monkeypatch.setattr(docs_examples, "ROOT", tmp_path)
    assert [b.code for b in docs_examples.python_blocks(Path("page.md"))] == [
        "raise RuntimeError('x')\n"
    ]


def test_every_page_with_python_examples_is_run() -> None:
    with_python = [
        page
        for page in [
            Path("README.md"),
            *sorted(
                p.relative_to(docs_examples.ROOT)
                for p in (docs_examples.ROOT / "docs").rglob("*.md")
            ),
        ]
        if docs_examples.python_blocks(page)
    ]
    assert with_python == docs_examples.PAGES


# --- 6. the reference test: a directive that renders nothing still counts --------------------


def test_a_commented_out_directive_is_not_a_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "page.md").write_text(
        "# Page\n\n<!--\n::: kling_async.KlingClient\n-->\n\n```text\n::: kling_async.Task\n```\n"
    )
    monkeypatch.setattr(docs_reference, "REFERENCE", tmp_path)
    assert docs_reference.directives() == []
