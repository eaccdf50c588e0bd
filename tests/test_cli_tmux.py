"""``kling-async batch`` in a real terminal: 500 rows, watched the way a person watches them.

The command runs in a tmux pane of a fixed size (120x30) against an emulator in another process
on a fast clock, with a few tasks failing. The pane is captured (``tmux capture-pane -p``)
while the batch runs and when it has ended, and the tests judge what is on the screen: the
live view fits the pane (the line above it is never scrolled away), shows counts, throughput
and an ETA, and does not print a line per row; the final screen shows the counts and the
failures only, and the last line says where the full list is.

Set ``KLING_ASYNC_CAPTURE_DIR`` to keep the two screens (``batch-live.txt``,
``batch-end.txt``) for a look. tmux is needed (CI installs it); without it the test is skipped,
saying so.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cli_helpers import KEY, ROOT, SCALE, EmulatorProcess, check_no_key, emulator_process

_NO_TMUX = (
    "tmux is not installed (CI installs it): this test drives the live view in a real terminal"
)


@pytest.fixture(autouse=True)
def _tmux() -> None:
    """Skipped without tmux, with the reason; in CI (``CI`` set) nothing required may be."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail(_NO_TMUX)
        pytest.skip(_NO_TMUX)


WIDTH, HEIGHT = 120, 30
ROWS = 500
#: A few failures among 500 rows (seeded: the same ones every run).
FAILURE_RATE = "0.02"


class Pane:
    """A detached tmux session of its own (its own server socket), one pane of a fixed size."""

    def __init__(self, command: str) -> None:
        self.socket = f"kling-async-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "batch", command)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603
            ["tmux", "-L", self.socket, "-f", os.devnull, *args],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def capture(self, *, joined: bool = False) -> str:
        """The screen as it is; ``joined``: lines the terminal wrapped joined again."""
        return self._tmux("capture-pane", "-p", *(["-J"] if joined else []), "-t", "batch")

    def size(self) -> tuple[int, int]:
        size = self._tmux("display-message", "-p", "-t", "batch", "#{pane_width} #{pane_height}")
        width, height = size.split()
        return int(width), int(height)

    def close(self) -> None:
        """Stop this session's tmux server, and remove its socket file (tmux leaves it)."""
        try:
            socket = Path(self._tmux("display-message", "-p", "#{socket_path}").strip())
        except subprocess.CalledProcessError:
            socket = None
        subprocess.run(  # noqa: S603
            ["tmux", "-L", self.socket, "kill-server"],  # noqa: S607
            capture_output=True,
            timeout=10,
            check=False,
        )
        if socket is not None and socket.name == self.socket:
            socket.unlink(missing_ok=True)


@pytest.fixture
def failing_server() -> Iterator[EmulatorProcess]:
    with emulator_process("--failure-rate", FAILURE_RATE, "--seed", "5") as emu:
        yield emu


def save(name: str, screen: str) -> None:
    where = os.environ.get("KLING_ASYNC_CAPTURE_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / name).write_text(screen)


def lines_of(screen: str) -> list[str]:
    lines = screen.rstrip("\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def test_a_500_row_batch_reads_well_in_a_120x30_terminal(
    failing_server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(f"clip number {i}: a lighthouse in a storm at dusk\n" for i in range(ROWS))
    )
    out = tmp_path / "out"
    exit_file = tmp_path / "exit-status"
    batch = [
        sys.executable,
        "-m",
        "kling_async.cli",
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--base-url",
        failing_server.url,
        "--time-scale",
        str(SCALE),
        "--max-active",
        "20",
    ]
    # A clean environment: no KLING_* of the developer's (a KLING_REDIS_URL would share the
    # batch), no COLUMNS or LINES (the pane's size is the terminal's).
    environment = {
        name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL") if name in os.environ
    }
    environment.update(
        KLING_API_KEY=KEY, PYTHONPATH=str(ROOT), TERM="xterm-256color", PYTHONUTF8="1"
    )
    command = (
        f"cd {shlex.quote(str(ROOT))} && env -i "
        + " ".join(f"{name}={shlex.quote(value)}" for name, value in environment.items())
        + " "
        + shlex.join(batch)
        + f"; echo $? > {shlex.quote(str(exit_file))}; sleep 120"
    )
    pane = Pane(command)
    try:
        assert pane.size() == (WIDTH, HEIGHT)
        # --- during the run: wait for a screen with a measured throughput, mid-batch -----
        live = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not exit_file.exists():
            screen = pane.capture()
            done = re.search(r"done (\d+) ·", screen)
            if done and 100 <= int(done[1]) <= ROWS - 100 and re.search(r"[\d,]+ rows/min", screen):
                live = screen
                break
            time.sleep(0.05)
        assert live, "never saw the live view mid-batch:\n" + pane.capture()
        save("batch-live.txt", live)
        check_no_key(live)
        shown = lines_of(live)
        # It fits: the line written above the view is still on screen, nothing scrolled.
        assert shown[0].startswith(f"{ROWS} rows (batch "), live
        assert len(shown) <= 24, f"the view does not fit a 24-line terminal:\n{live}"
        assert all(len(line) <= WIDTH for line in shown)
        assert re.search(r"━+.* \d+/500 ", live), live  # the bar, with rows finished of all
        assert re.search(r"done \d+ · .*queued \d+", live), live  # counts per state
        assert re.search(r"throughput [\d,]+ rows/min \(last 60 s\)", live), live
        assert re.search(r"ETA \d+:\d\d:\d\d for \d+ rows", live), live
        assert re.search(r"slots \d+/\d+", live), live
        # Not a line per row: a few latest changes, a few longest-running rows.
        assert len(re.findall(r"^\s+(?:\S+ ago\s+)?row \d+ ", live, re.MULTILINE)) <= 12, live

        # --- the end ----------------------------------------------------------------------
        deadline = time.monotonic() + 40
        while not exit_file.exists():
            assert time.monotonic() < deadline, "the batch did not end:\n" + pane.capture()
            time.sleep(0.05)
        time.sleep(0.3)  # the pane has drawn the last line
        end = pane.capture()
        save("batch-end.txt", end)
        check_no_key(end)
        logical = lines_of(pane.capture(joined=True))
    finally:
        pane.close()

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == ROWS  # the full list is there
    failed = [row["row"] for row in summary["rows"] if row["status"] != "done"]
    assert 1 <= len(failed) <= 30, failed
    assert exit_file.read_text().strip() == "1"
    shown = lines_of(end)
    assert len(shown) <= HEIGHT
    # The live view is gone; one line says how long it took.
    assert "running longest" not in end
    assert "latest:" not in end
    assert re.search(r"500 rows finished in \d+:\d\d:\d\d \([\d,]+ rows/min on average\)", end)
    # The table: the failures and nothing else.
    assert f"rows not done: {len(failed)} of {ROWS}" in end, end
    table = [line for line in shown if line.startswith("│")]
    assert [int(line.split("│")[1]) for line in table] == failed, end
    assert all(line.split("│")[2].strip() == "failed" for line in table), end
    assert all("Video generation failed" in line for line in table), end
    # The last line: the counts, and where the full list is.
    last = logical[-1].rstrip()
    assert last.startswith(f"{ROWS} rows: {ROWS - len(failed)} done, {len(failed)} failed; "), end
    assert f"all rows in {out / 'summary.json'}" in last, end
    assert f"--retry-failed resends the {len(failed)} (billed again)" in last, end
