"""``kling-async batch`` at 500 rows: what is printed must not grow with the batch.

The final table lists the rows not done (all rows in summary.json, and ``--verbose``
prints every row); the live view is a fixed-height view with throughput and an ETA, whatever
the number of rows. Batches run against the emulator in another process over loopback HTTP.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

import kling_async as ka
from kling_async.cli._journal import JournalRow
from kling_async.cli._progress import LiveProgress, Throughput, clock_text
from kling_async.cli._prompts import Defaults, load_prompts
from kling_async.cli._rows import Phase, RowState

from .cli_helpers import EmulatorProcess, batch_command, run_main, write_prompts

ROWS = 500


def table_rows(text: str) -> list[tuple[str, str]]:
    """(row, status) of each body line of the final table."""
    found = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) > 3 and line.startswith("│") and cells[1]:  # not a folded cell's rest
            found.append((cells[1], cells[2]))
    return found


def test_the_final_table_of_500_rows_lists_what_is_not_done(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", ROWS)
    out = tmp_path / "out"
    server.configure(failure_rate=0.02)
    result = run_main(batch_command(prompts, out, server))
    assert result.code == 1, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == ROWS  # summary.json keeps every row
    failed = [str(row["row"]) for row in summary["rows"] if row["status"] != "done"]
    assert failed, "failure_rate=0.02 failed no row of 500"
    end = result.out[result.out.index("rows not done: ") :]
    assert end.startswith(f"rows not done: {len(failed)} of {ROWS}")
    assert table_rows(end) == [(row, "failed") for row in failed]
    last = result.out.rstrip().splitlines()[-1]
    assert last == (
        f"{ROWS} rows: {ROWS - len(failed)} done, {len(failed)} failed; all rows in "
        f"{out / 'summary.json'}; --retry-failed resends the {len(failed)} (billed again)"
    )

    # --verbose: every row, as before; a rerun sends nothing (done and failed rows stay).
    creates = server.stats()["requests_per_route"]["create"]
    verbose = run_main([*batch_command(prompts, out, server), "--verbose"])
    assert verbose.code == 1, verbose.err
    assert server.stats()["requests_per_route"]["create"] == creates
    every = verbose.out[verbose.out.index(f"every row ({ROWS})") :]
    shown = table_rows(every)
    assert [row for row, _status in shown] == [str(number) for number in range(1, ROWS + 1)]
    assert {row for row, status in shown if status == "failed"} == set(failed)
    assert verbose.out.rstrip().splitlines()[-1] == last


def test_a_batch_with_every_row_done_prints_no_table(
    server: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 60)
    out = tmp_path / "out"
    result = run_main(batch_command(prompts, out, server))
    assert result.code == 0, result.err
    assert "│" not in result.out
    assert result.out.rstrip().splitlines()[-1] == (
        f"60 rows: 60 done; clips in {out}/, all rows in {out / 'summary.json'}"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def states_for(tmp_path: Path, count: int) -> list[RowState]:
    path = write_prompts(tmp_path / "many.txt", count)
    states = []
    for row in load_prompts(path, Defaults(), ka.COMETAPI).rows:
        record = JournalRow(
            key=row.key,
            number=row.number,
            line=row.line,
            request_hash=row.request_hash,
            request_json=row.request_json,
            external_task_id=f"kb-x-{row.number}",
            attempt=1,
            task_id=None,
            status="pending",
            video_id=None,
            video_url=None,
            file=f"{row.number:03}-x.mp4",
            sha256=None,
            size=None,
            error=None,
            submitted_at=None,
            finished_at=None,
        )
        states.append(RowState(row, record, Phase.WAITING))
    return states


def drawn(view: LiveProgress, width: int, height: int) -> list[str]:
    screen = io.StringIO()
    Console(file=screen, width=width, height=height, color_system=None).print(view.render())
    return screen.getvalue().rstrip("\n").split("\n")


@pytest.mark.parametrize(("width", "height"), [(80, 24), (200, 50), (60, 12)])
def test_the_live_view_of_500_rows_has_a_fixed_height(
    tmp_path: Path, width: int, height: int
) -> None:
    clock = Clock()
    console = Console(file=io.StringIO(), width=width, height=height, force_terminal=True)
    view = LiveProgress(console, clock=clock)
    states = states_for(tmp_path, ROWS)
    stats = SimpleNamespace(active=20, active_limit=20.0, requests=1234)
    view.attach(states, lambda: stats)  # type: ignore[arg-type,return-value]
    # One minute of work: 200 rows done, 5 failed, 20 running, the rest queued.
    for index, state in enumerate(states[:205]):
        clock.now += 60.0 / 205
        state.task_id = f"task-{state.row.number}"
        state.move(Phase.PROCESSING)
        if index % 41 == 40:
            state.move(Phase.FAILED)
            state.error = "Video generation failed"
            view.changed(state, "failed: Video generation failed")
        else:
            state.move(Phase.DONE)
            view.changed(state, f"saved {state.record.file}")
    for state in states[205:225]:
        state.task_id = f"task-{state.row.number}"
        state.move(Phase.PROCESSING)
        view.changed(state, f"processing (task {state.task_id})")
    lines = drawn(view, width, height)
    view.close()
    assert len(lines) <= max(3, min(24, height) - 6), "\n".join(lines)
    text = "\n".join(lines)
    assert all(len(line) <= width for line in lines)
    assert re.search(r"205/500", text), text
    assert "done 200 · running 20 · queued 275 · failed 5" in text
    # 205 finished in the last 60 s: 205/min, and 295 rows to go take 86 s.
    if width >= 80:
        assert "  throughput 205 rows/min (last 60 s) · ETA 0:01:26 for 295 rows\n" in text
    else:  # cut, never wrapped
        assert "  throughput 205 rows/min (last 60 s) · ETA 0:01:26 for 295…\n" in text
    assert "  slots 20/20 · requests 1,234\n" in text
    if height >= 24:
        assert "latest failures, 5 in all (all of them at the end):" in text
        assert "row 205 failed: Video generation failed" in text
        assert "running longest:" in text
        assert "latest:" in text
    # Never a line per row.
    assert len(re.findall(r"row \d+ ", text)) <= 12


def test_throughput_slides_and_the_eta_follows() -> None:
    clock = Clock()
    speed = Throughput(window=60.0, clock=clock)
    assert speed.per_minute() is None
    assert speed.eta(10) is None
    clock.now += 30
    for _ in range(15):
        speed.add()
    assert speed.per_minute() == pytest.approx(30.0)  # 15 in the first 30 s
    assert speed.eta(60) == pytest.approx(120.0)
    clock.now += 61  # a minute later: none finished in the window
    assert speed.per_minute() is None
    assert speed.eta(60) is None
    for _ in range(6):
        clock.now += 10
        speed.add()
    assert speed.per_minute() == pytest.approx(6.0)
    assert speed.eta(0) == 0.0
    assert clock_text(86) == "0:01:26"
    assert clock_text(90_061) == "1 d 1:01:01"
