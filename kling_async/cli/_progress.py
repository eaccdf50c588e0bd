"""Progress: a live view on a terminal, one plain line per change anywhere else.

On a terminal, a rich ``Live`` region shows an overall bar (counts per state, rows finished,
elapsed time and an ETA) above a small table of the active rows. It is redrawn a few times a
second by one coroutine on the event loop, reading the runner's row states: the pollers and
the journal never wait for the screen, and no other thread touches the states.

Elsewhere (a log file, CI, a pipe) the same changes become plain timestamped lines, which
``grep`` and a human scrolling back both read better than a redrawn region.

Prompts, task ids and messages come from outside: both views escape them
(:func:`~._display.printable`) and never let rich read them as markup.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TextIO

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

import kling_async as ka

from ._display import plain, printable
from ._rows import GROUPS, Phase, RowState, tally

__all__ = ["LiveProgress", "PlainProgress", "Reporter"]

_REFRESH_SECONDS = 0.25
_ACTIVE_ROWS_SHOWN = 8


class Reporter(Protocol):
    """What the batch runner tells the display."""

    def attach(self, states: Sequence[RowState], stats: Callable[[], ka.ClientStats]) -> None: ...

    def changed(self, state: RowState, message: str | None) -> None:
        """A row moved; ``message`` says how, in words (None: count it, say nothing, as for
        rows an account-level error kept from being sent: they are reported as a count)."""
        ...

    def note(self, message: str) -> None:
        """Something worth a line of its own (a warning, a retry, an account problem)."""
        ...

    async def run(self) -> None:
        """Redraw until cancelled (a no-op for plain output)."""
        ...

    def close(self) -> None: ...


def _counts_text(states: Sequence[RowState]) -> str:
    counts = tally(states)
    return " · ".join(
        f"{group} {counts[group]}"
        for group in GROUPS
        if counts[group] or group in ("done", "failed")
    )


def _finished(states: Sequence[RowState]) -> int:
    return sum(state.phase.is_final for state in states)


def _prompt(state: RowState, width: int = 60) -> str:
    prompt = " ".join(state.row.request.prompt.split())
    return prompt if len(prompt) <= width else prompt[: width - 1] + "…"


class PlainProgress:
    """One line per change: ``12:00:01 [ 3/12] row 4: saved 004-a-red-fox.mp4 (5.1 s)``."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._total = 0
        # Rows seen finished, kept as we go: recounting every row per line would make a
        # 100,000-row batch quadratic.
        self._finished: set[int] = set()

    def attach(self, states: Sequence[RowState], stats: Callable[[], ka.ClientStats]) -> None:
        self._total = len(states)
        self._finished = {state.row.number for state in states if state.phase.is_final}

    def _write(self, text: str) -> None:
        out = self._out or sys.stdout
        out.write(f"{datetime.now():%H:%M:%S} {printable(text)}\n")
        out.flush()

    def changed(self, state: RowState, message: str | None) -> None:
        if state.phase.is_final:
            self._finished.add(state.row.number)
        else:  # a shared batch's row taken over here from another machine
            self._finished.discard(state.row.number)
        if message is None:
            return
        width = len(str(self._total))
        self._write(
            f"[{len(self._finished):>{width}}/{self._total}] row {state.row.number}: {message}"
        )

    def note(self, message: str) -> None:
        self._write(message)

    async def run(self) -> None:
        return

    def close(self) -> None:
        return


class LiveProgress:
    """The terminal view; see the module docstring."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._states: Sequence[RowState] = ()
        self._stats: Callable[[], ka.ClientStats] | None = None
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._live: Live | None = None

    def attach(self, states: Sequence[RowState], stats: Callable[[], ka.ClientStats]) -> None:
        self._states = states
        self._stats = stats
        earlier = sum(state.earlier for state in states)
        # Rows finished by earlier runs start the bar, so the ETA reflects this run's speed.
        self._task = self._progress.add_task(
            _counts_text(states), total=len(states), completed=earlier
        )
        self._live = Live(
            self._render(),
            console=self._console,
            auto_refresh=False,
            transient=False,
            # Log lines and warnings written to stderr meanwhile appear above the region.
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self._live.start(refresh=True)

    def _render(self) -> RenderableType:
        if self._task is not None:
            self._progress.update(
                self._task,
                completed=_finished(self._states),
                description=_counts_text(self._states),
            )
        active = sorted(
            (state for state in self._states if state.active),
            key=lambda state: state.active_since or state.since,
        )
        parts: list[RenderableType] = [self._progress]
        if active:
            table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
            for column in ("row", "state", "task", "for"):
                table.add_column(
                    column, no_wrap=True, justify="right" if column in ("row", "for") else "left"
                )
            table.add_column(
                "prompt", no_wrap=True, overflow="ellipsis", max_width=self._console.width - 45
            )
            now = time.monotonic()
            for state in active[:_ACTIVE_ROWS_SHOWN]:
                table.add_row(
                    str(state.row.number),
                    state.phase.value,
                    plain(state.task_id or "-"),
                    f"{now - (state.active_since or state.since):.0f}s",
                    plain(_prompt(state)),
                )
            parts.append(table)
            if len(active) > _ACTIVE_ROWS_SHOWN:
                parts.append(Text(f"  ... and {len(active) - _ACTIVE_ROWS_SHOWN} more active"))
        if self._stats is not None:
            stats = self._stats()
            limit = "?" if stats.active_limit == float("inf") else f"{stats.active_limit:g}"
            parts.append(
                Text(
                    f"  slots {stats.active}/{limit} · requests {stats.requests}",
                    style="dim",
                )
            )
        return Group(*parts)

    def changed(self, state: RowState, message: str | None) -> None:
        # Only what a person must not miss gets a line above the live region.
        if message is not None and state.phase in (Phase.FAILED, Phase.REJECTED, Phase.ERROR):
            self.note(f"row {state.row.number}: {message}")

    def note(self, message: str) -> None:
        self._console.print(plain(message))

    async def run(self) -> None:
        while True:
            if self._live is not None:
                self._live.update(self._render(), refresh=True)
            await anyio.sleep(_REFRESH_SECONDS)

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.stop()
            self._live = None
