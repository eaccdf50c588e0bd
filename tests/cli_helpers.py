"""Helpers for the command-line tests: an emulator in its own process, driven over its admin
endpoints, and the ``kling-async`` command run as a real process that can be killed.

The emulator lives in a separate process so that it outlives a ``kill -9`` of the batch and
keeps the ground truth (tasks created per external id, each video's SHA-256) the tests judge
by. Every run of the command line is checked for the test key in its output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from kling_async.cli._journal import row_status

ROOT = Path(__file__).resolve().parent.parent
#: A distinctive key the emulator accepts; it must never appear in any output.
KEY = "sk-cli-test-SECRET-7f3a9c1e5b2d4680"
#: Real seconds per emulated second: a 90 s task takes 0.18 s.
SCALE = 0.002
DEFAULTS: dict[str, Any] = {
    "failure_rate": 0.0,
    "median_duration": 90.0,
    "concurrency_limit": None,
    "account_error": None,
    "download_rate": None,
    "url_ttl": None,
    "visibility_lag": 0.0,
    "duplicate_external_id": "reject",
    "result_url": None,
}


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this checkout importable, no real keys."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("KLING_") and key not in ("COLUMNS", "LINES")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@attrs.define
class EmulatorProcess:
    """``python -m kling_async.testing --admin`` in a child process."""

    process: subprocess.Popen[bytes]
    url: str

    @classmethod
    def start(cls, *extra: str) -> EmulatorProcess:
        command = [
            sys.executable,
            "-m",
            "kling_async.testing",
            "--port",
            "0",
            "--time-scale",
            str(SCALE),
            "--admin",
            "--api-key",
            KEY,
            "--stall-seconds",
            "5",
            *extra,
        ]
        process = subprocess.Popen(  # noqa: S603
            command, stdout=subprocess.PIPE, env=child_env(), cwd=ROOT
        )
        assert process.stdout is not None
        lines: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while "api_key" not in lines and time.monotonic() < deadline:
            line = process.stdout.readline().decode()
            if not line:
                break
            name, _, value = line.strip().partition("=")
            lines[name] = value
        if "url" not in lines:
            process.kill()
            raise RuntimeError("the emulator did not start")
        return cls(process, lines["url"])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    # --- admin --------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (loopback URL we started)
            self.url + "/_emulator" + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def tasks(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tasks")
        return result

    def configure(self, **settings: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/settings", settings)
        return result

    def faults(self, body: dict[str, Any] | None) -> None:
        self._call("POST", "/faults", body or {})

    def reset(self) -> None:
        self.faults(None)
        self.configure(**DEFAULTS)

    def total_requests(self) -> int:
        return sum(self.stats()["requests_per_route"].values())


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def check_no_key(*texts: str) -> None:
    for text in texts:
        assert KEY not in text, "the API key leaked into the output"
        assert "7f3a9c1e5b2d4680" not in text, "part of the API key leaked into the output"


def batch_command(
    prompts: Path, out: Path, emu: EmulatorProcess, *extra: str, progress: str | None = "plain"
) -> list[str]:
    """``kling-async batch`` against ``emu``; ``progress=None`` gives no ``--progress`` (which
    ``--json`` and ``--quiet`` refuse)."""
    shown = ["--progress", progress] if progress is not None else []
    return [
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--base-url",
        emu.url,
        "--time-scale",
        str(SCALE),
        *shown,
        *extra,
    ]


def cli_process(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m kling_async.cli ARGS`` with ``KLING_API_KEY`` set to the test key."""
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "kling_async.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else child_env(KLING_API_KEY=KEY),
        cwd=ROOT,
    )


def finish(process: subprocess.Popen[str], timeout: float = 60) -> Result:
    out, err = process.communicate(timeout=timeout)
    check_no_key(out, err)
    return Result(process.returncode, out, err)


def run_cli(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    return finish(cli_process(args, env), timeout)


def run_main(
    args: Sequence[str], *, key: str | None = KEY, env: dict[str, str] | None = None
) -> Result:
    """The command line in this process (fast: no interpreter start), with ``KLING_API_KEY``
    set to ``key``, the ``env`` variables set, and every other ``KLING_*`` variable removed
    for the call."""
    from kling_async.cli import main

    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("KLING_")}
    if key is not None:
        os.environ["KLING_API_KEY"] = key
    extra = env or {}
    shadowed = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.environ.pop("KLING_API_KEY", None)
        for name, value in shadowed.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.environ.update(saved)
    check_no_key(out.getvalue(), err.getvalue())
    return Result(code, out.getvalue(), err.getvalue())


def kill_when(
    process: subprocess.Popen[str], ready: Callable[[], bool], timeout: float = 20
) -> None:
    """``kill -9`` the process as soon as ``ready()`` holds (checked every 5 ms)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the batch ended before the kill point"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.005)
    finally:
        process.kill()
        out, err = process.communicate(timeout=10)
        check_no_key(out, err)
    assert process.returncode == -signal.SIGKILL


def wait_for(ready: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def write_prompts(path: Path, count: int, tag: str = "clip") -> Path:
    path.write_text("".join(f"{tag} number {i}: a lighthouse in a storm\n" for i in range(count)))
    return path


def journal_rows(out: Path) -> list[dict[str, Any]]:
    """Every journal row as a dict, with its job's task id, status and duplicate flag from the
    job store's record beside it (read-only; works while a batch writes, and after a kill)."""
    path = out / "kling-journal.sqlite3"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        try:
            found = db.execute(
                "SELECT r.*, j.task_id AS task_id, j.status AS job_status, j.task AS job_task, "
                "coalesce(j.possible_duplicate, 0) AS possible_duplicate FROM rows r "
                "LEFT JOIN kling_jobs j ON j.id = r.external_task_id ORDER BY r.number"
            ).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []
    rows = []
    for found_row in found:
        row = dict(found_row)
        job, task = row.pop("job_status"), row.pop("job_task")
        row["status"] = row_status(row["outcome"], job, row["task_id"], task)
        rows.append(row)
    return rows


def created_for(emu: EmulatorProcess, rows: Sequence[dict[str, Any]]) -> list[int]:
    counts = emu.stats()["created_per_external_id"]
    return [counts.get(row["external_task_id"], 0) for row in rows]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(out: Path) -> list[str]:
    """Partial or temporary files left in ``out``."""
    return sorted(
        path.name
        for path in out.iterdir()
        if path.name.endswith((".part", ".tmp")) or ".part" in path.name
    )


def assert_complete(emu: EmulatorProcess, out: Path, rows_expected: int) -> list[dict[str, Any]]:
    """Zero duplicate tasks, zero lost rows, zero corrupt files, nothing partial left."""
    rows = journal_rows(out)
    assert len(rows) == rows_expected
    assert [row["status"] for row in rows] == ["done"] * rows_expected
    assert created_for(emu, rows) == [1] * rows_expected
    truth = {task["external_task_id"]: task for task in emu.tasks() if task["external_task_id"]}
    for row in rows:
        task = truth[row["external_task_id"]]
        assert row["task_id"] == task["task_id"]
        [video] = task["videos"]
        path = out / row["file"]
        assert sha256_file(path) == video["sha256"] == row["sha256"]
        assert path.stat().st_size == row["size"]
    assert leftovers(out) == []
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["status"] for entry in summary["rows"]] == ["done"] * rows_expected
    return rows


@contextlib.contextmanager
def emulator_process(*extra: str) -> Iterator[EmulatorProcess]:
    emu = EmulatorProcess.start(*extra)
    try:
        yield emu
    finally:
        emu.stop()
