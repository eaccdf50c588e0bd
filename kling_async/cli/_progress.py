"""Progress: a live view on a terminal, plain lines elsewhere, JSON lines with ``--json``.

On a terminal, a rich ``Live`` region shows a compact view whose height does not grow with
the batch: a bar (rows finished of all, elapsed time), the count per state, the throughput
(rows finished per minute over the last minute) with the ETA it implies for the rest, the
client's slots and requests, then the few longest-running rows, the latest changes and the
latest failures. It fits a 24-line terminal for 5 rows or 100,000 (sections are dropped on a
smaller one), and it is redrawn a few times a second by one coroutine on the event loop,
reading the runner's row states: the pollers and the journal never wait for the screen, and
no other thread touches the states. When the run ends the region is cleared and one line
says how long it took; the final table (failures only) follows.

Elsewhere (a log file, CI, a pipe) the same changes become plain timestamped lines, which
``grep`` and a human scrolling back both read better than a redrawn region.

With ``--json``, stdout gets one JSON object per status change of a row (:class:`JsonProgress`)
and nothing else; notes go to stderr. With ``--quiet`` nothing is shown while the batch runs
(:class:`QuietProgress`).

Prompts, task ids and messages come from outside: every view escapes them
(:func:`~._display.printable`; JSON escapes every control character itself) and never lets rich
read them as markup.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TextIO

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TimeElapsedColumn,
)
from rich.text import Text

import kling_async as ka

from ._display import plain, printable
from ._messages import tell
from ._rows import GROUPS, Phase, RowState, tally

__all__ = [
    "JsonProgress",
    "LiveProgress",
    "PlainProgress",
    "QuietProgress",
    "Reporter",
    "Throughput",
    "clock_text",
    "status_event",
    "write_json_line",
]

_REFRESH_SECONDS = 0.25
#: The throughput's sliding window.
WINDOW_SECONDS: Final = 60.0
#: At most this many lines per section of the live view.
_ACTIVE_SHOWN = 3
_RECENT_SHOWN = 4
_FAILURES_SHOWN = 3
_PROBLEMS = (Phase.FAILED, Phase.REJECTED, Phase.ERROR)


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


def clock_text(seconds: float) -> str:
    """``0:04:09``; ``3 d 2:00:00`` beyond a day."""
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02}:{secs:02}"
    return f"{days} d {text}" if days else text


class Throughput:
    """Rows finished per minute over a sliding window, and the ETA it implies.

    Only this run's finishes count (rows done by earlier runs are not this run's speed).
    Until the window has passed, the rate is over the time since the run started, so the
    first minute of a batch of long tasks does not promise an ETA it cannot keep.
    """

    def __init__(
        self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self._clock = clock
        self.started = clock()
        self._times: deque[float] = deque()
        self.total = 0

    def add(self) -> None:
        self._times.append(self._clock())
        self.total += 1

    def per_minute(self) -> float | None:
        """None until a row has finished."""
        now = self._clock()
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
        span = min(self.window, now - self.started)
        if not self._times or span <= 0:
            return None
        return len(self._times) * 60.0 / span

    def eta(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` more rows finish at the current rate (None: unknown)."""
        if remaining <= 0:
            return 0.0
        rate = self.per_minute()
        return None if not rate else remaining * 60.0 / rate


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "-- rows/min"
    return f"{rate:,.0f} rows/min" if rate >= 10 else f"{rate:.1f} rows/min"


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


class QuietProgress:
    """``--quiet``: nothing while the batch runs (errors and the last line come after)."""

    def attach(self, states: Sequence[RowState], stats: Callable[[], ka.ClientStats]) -> None:
        return

    def changed(self, state: RowState, message: str | None) -> None:
        return

    def note(self, message: str) -> None:
        return

    async def run(self) -> None:
        return

    def close(self) -> None:
        return


def now_iso() -> str:
    """The instant of a ``--json`` object (its ``time``): UTC, milliseconds, a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_event(state: RowState) -> dict[str, Any]:
    """One ``--json`` line for a row's state: the same keys every time (None where unknown)."""
    return {
        "event": "status",
        "time": now_iso(),
        "row": state.row.number,
        "line": state.row.line,
        "external_task_id": state.record.external_task_id,
        "task_id": state.task_id,
        "status": state.phase.value,
        "error": state.error if state.phase in _PROBLEMS else None,
        "error_code": state.error_code if state.phase in _PROBLEMS else None,
        "file": state.record.file if state.phase is Phase.DONE else None,
    }


def write_json_line(out: TextIO, payload: Mapping[str, Any]) -> None:
    """One object, one line (ASCII: every control character and non-ASCII one escaped)."""
    out.write(json.dumps(payload, separators=(",", ":")) + "\n")
    out.flush()


class JsonProgress:
    """``--json``: a ``start`` object, then a ``status`` object per change of a row's state
    (each state once per row: a repeated report is not a change), on stdout; notes as
    timestamped lines on stderr (none with ``--quiet``). The caller writes the ``summary``
    object at the end."""

    def __init__(self, stream: TextIO | None = None, **start: Any) -> None:
        self._out = stream
        self._start = start
        self._last: dict[int, Phase] = {}

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def attach(self, states: Sequence[RowState], stats: Callable[[], ka.ClientStats]) -> None:
        earlier = tally(state for state in states if state.earlier)
        self._last = {state.row.number: state.phase for state in states}
        write_json_line(
            self.out,
            {
                "event": "start",
                "time": now_iso(),
                **self._start,
                "rows": len(states),
                "earlier": dict(sorted(earlier.items())),
                "to_do": sum(not state.earlier for state in states),
            },
        )

    def changed(self, state: RowState, message: str | None) -> None:
        if self._last.get(state.row.number) is state.phase:
            return
        self._last[state.row.number] = state.phase
        write_json_line(self.out, status_event(state))

    def note(self, message: str) -> None:
        tell(f"{datetime.now():%H:%M:%S} {message}")

    async def run(self) -> None:
        return

    def close(self) -> None:
        return


def _line(text: str, style: str = "") -> Text:
    """One line of the live view: escaped, never wrapped (cut with an ellipsis instead), so
    the view's height is what it was built to be, whatever the width."""
    line = plain(text, style)
    line.no_wrap = True
    line.overflow = "ellipsis"
    return line


class LiveProgress:
    """The terminal view; see the module docstring."""

    def __init__(self, console: Console, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._clock = clock
        self._states: Sequence[RowState] = ()
        self._stats: Callable[[], ka.ClientStats] | None = None
        self._progress = Progress(
            SpinnerColumn(),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            expand=True,
        )
        self._task: TaskID | None = None
        self._live: Live | None = None
        self._throughput = Throughput(clock=clock)
        #: The latest changes (when, row, what), and the latest failures.
        self._recent: deque[tuple[float, RowState, str]] = deque(maxlen=_RECENT_SHOWN)
        self._failures: deque[tuple[float, RowState, str]] = deque(maxlen=_FAILURES_SHOWN)
        self._failed = 0

    def attach(self, states: Sequence[RowState], stats: Callable[[], ka.ClientStats]) -> None:
        self._states = states
        self._stats = stats
        self._throughput = Throughput(clock=self._clock)
        earlier = sum(state.earlier for state in states)
        self._task = self._progress.add_task("rows", total=len(states), completed=earlier)
        self._live = Live(
            self.render(),
            console=self._console,
            auto_refresh=False,
            transient=True,
            # Log lines and warnings written to stderr meanwhile appear above the region.
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self._live.start(refresh=True)

    def _budget(self) -> int:
        """Lines the view may take: the terminal's height less room for the notes above."""
        return max(3, min(24, self._console.height) - 6)

    def render(self) -> RenderableType:
        """The view as it is now (also for tests)."""
        states = self._states
        finished = _finished(states)
        if self._task is not None:
            self._progress.update(self._task, completed=finished)
        remaining = len(states) - finished
        rate = self._throughput.per_minute()
        eta = self._throughput.eta(remaining)
        eta_text = "--:--:--" if eta is None else clock_text(eta)
        speed = (
            f"  throughput {_rate_text(rate)} (last {self._throughput.window:.0f} s)"
            f" · ETA {eta_text} for {remaining} rows"
        )
        parts: list[RenderableType] = [
            self._progress,
            _line(f"  {_counts_text(states)}", "bold"),
            _line(speed),
        ]
        if self._stats is not None:
            stats = self._stats()
            limit = "?" if stats.active_limit == float("inf") else f"{stats.active_limit:g}"
            parts.append(
                _line(f"  slots {stats.active}/{limit} · requests {stats.requests:,}", "dim")
            )
        budget = self._budget() - len(parts)
        now = self._clock()
        sections = []
        if self._failures and budget >= 2:
            shown = list(self._failures)[-min(len(self._failures), budget - 1) :]
            more = " (all of them at the end)" if self._failed > len(shown) else ""
            lines = [_line(f"  latest failures, {self._failed} in all{more}:", "bold red")]
            lines += [
                _line(f"    row {state.row.number} {text}", "red") for _when, state, text in shown
            ]
            sections.append(lines)
            budget -= len(lines)
        if self._recent and budget >= 2:
            shown = list(self._recent)[-min(len(self._recent), budget - 1) :]
            lines = [_line("  latest:", "bold")]
            lines += [
                _line(f"    {now - when:>4.0f}s ago  row {state.row.number} {text}")
                for when, state, text in shown
            ]
            sections.insert(0, lines)
            budget -= len(lines)
        if budget >= 2:
            active = sorted(
                (state for state in states if state.active),
                key=lambda state: state.active_since or state.since,
            )[: min(_ACTIVE_SHOWN, budget - 1)]
            if active:
                lines = [_line("  running longest:", "bold")]
                lines += [
                    _line(
                        f"    row {state.row.number} {state.phase.value} for "
                        f"{now - (state.active_since or state.since):.0f}s, "
                        f"task {state.task_id or '-'}: {_prompt(state)}"
                    )
                    for state in active
                ]
                sections.insert(0, lines)
        for lines in sections:
            parts.extend(lines)
        return Group(*parts)

    def changed(self, state: RowState, message: str | None) -> None:
        now = self._clock()
        if state.phase.is_final and not state.earlier and state.phase is not Phase.ELSEWHERE:
            self._throughput.add()
        if state.phase in _PROBLEMS:
            self._failed += 1
            self._failures.append((now, state, f"{state.phase.value}: {state.error or ''}"))
        elif message is not None:
            self._recent.append((now, state, message))

    def note(self, message: str) -> None:
        self._console.print(plain(message))

    async def run(self) -> None:
        while True:
            if self._live is not None:
                self._live.update(self.render(), refresh=True)
            await anyio.sleep(_REFRESH_SECONDS)

    def close(self) -> None:
        if self._live is None:
            return
        self._live.update(self.render(), refresh=True)
        self._live.stop()
        self._live = None
        elapsed = self._clock() - self._throughput.started
        done = self._throughput.total
        rate = done * 60.0 / elapsed if elapsed > 0 else 0.0
        self._console.print(
            plain(f"{done} rows finished in {clock_text(elapsed)} ({_rate_text(rate)} on average)")
        )
