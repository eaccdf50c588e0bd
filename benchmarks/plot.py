"""The polling figure the docs show: polls against lag, and makespan over the zero-lag oracle.

``python -m benchmarks polling --plot`` draws it from the run that printed the lines (the
figures the suites return, not a second run); ``python -m benchmarks --plot-from FILE`` draws
it from the lines such a run printed (``python -m benchmarks polling | tee run.txt``), running
nothing. One PNG, 1600 x 700 px (``docs/img/benchmark-polling.png`` unless ``--plot-file``):

- left, polls per task against mean detection lag for every polling contender, and the
  optimal inspection schedule for the run's true distribution traced across lag weights (the
  ``polling_bound_curve`` lines: what no poller doing one GET per look beats by much at that
  lag), with each SDK contender's point joined to the bound at its own lag (``polling_bound``);
- right, makespan over the zero-lag oracle for every contender, the callbacks suite's too when
  it ran in the same invocation (or its lines are in the file).

The lines read (``NAME key=value ...``; others are skipped): ``polling_workload`` (the title),
``polling contender=...``, ``polling_bound_curve``, ``polling_bound`` (optional), and the
callbacks suite's ``callbacks_workload``, ``callbacks``, ``callbacks-terminal`` and
``polling`` (that suite's line has no ``contender`` field; the polling suite's has one).

matplotlib (the ``[bench]`` extra) is imported only to draw, with the Agg backend.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.transforms import Bbox

    from .polling import Results

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "img" / "benchmark-polling.png"
SIZE_PX = (1600, 700)
DPI = 100
FONT_SIZE = 12
#: Issue 11's makespan target (at most 1.015x the zero-lag oracle), drawn as a guide.
MAKESPAN_TARGET = 1.015

#: The SDK's contenders (the rest of the polling suite's are hand-written loops).
SDK_CONTENDERS = ("kling_async", "kling_async_warm", "kling_async_unknown_limit")
#: How the callbacks suite's contenders are labelled beside the polling suite's.
CALLBACKS_LABELS = {
    "callbacks": "callbacks (every change)",
    "callbacks-terminal": "callbacks-terminal",
    "polling": "FastAPI app polling",
}
COLOURS = {"sdk": "#1f63b4", "sweep": "#2a9d8f", "fixed": "#d1495b", "callbacks": "#7b4fb3"}


class PlotError(Exception):
    """The plot cannot be drawn; the message says why."""


class PlotInputError(PlotError, ValueError):
    """A printed line the plot needs is missing, or one of its fields is missing or garbled."""


class PlotUnavailableError(PlotError, RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fail early, before minutes of benchmarks, if the plot could not be drawn after them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailableError(
            "the plot needs matplotlib, the [bench] extra: pip install 'kling-async[bench]' "
            "(or run it through nox -s bench -- --plot)"
        ) from exc


@attrs.frozen
class WorkloadInfo:
    tasks: int
    slots: int
    median_s: float
    sigma: float
    seed: int
    time_scale: float


@attrs.frozen
class Contender:
    """One polling contender's figures, as its ``polling contender=NAME`` line printed them."""

    name: str
    lag_mean_s: float
    polls_per_task: float
    makespan_over_oracle: float


@attrs.frozen
class Figures:
    """Everything the plot shows, from a run's results or from its printed lines."""

    workload: WorkloadInfo
    contenders: tuple[Contender, ...]
    #: (lag_mean_s, polls_per_task) of the bound, in order of growing lag weight.
    curve: tuple[tuple[float, float], ...]
    #: contender -> (lag_mean_s, known_distribution_polls_per_task) from ``polling_bound``.
    bounds: Mapping[str, tuple[float, float]] = attrs.field(factory=dict)
    #: The callbacks suite's contenders (printed name -> makespan over the oracle), if it ran.
    callbacks: Mapping[str, float] = attrs.field(factory=dict)
    callbacks_workload: WorkloadInfo | None = None


@attrs.frozen
class Series:
    """What is plotted: the left panel's points and curve, the right panel's ratios (in order)."""

    #: contender -> (mean lag in s, polls per task)
    points: Mapping[str, tuple[float, float]]
    curve: tuple[tuple[float, float], ...]
    #: contender -> (bound's lag, bound's polls) at the contender's own lag
    bounds: Mapping[str, tuple[float, float]]
    #: (label, makespan over the zero-lag oracle), top to bottom
    makespan: tuple[tuple[str, float], ...]


def series(figures: Figures) -> Series:
    """The series :func:`draw` plots for ``figures``."""
    makespan = [(c.name, c.makespan_over_oracle) for c in figures.contenders]
    makespan += [(CALLBACKS_LABELS.get(n, n), v) for n, v in figures.callbacks.items()]
    return Series(
        points={c.name: (c.lag_mean_s, c.polls_per_task) for c in figures.contenders},
        curve=figures.curve,
        bounds=dict(figures.bounds),
        makespan=tuple(makespan),
    )


# --- From a run ---------------------------------------------------------------------------


def _info(w: Any) -> WorkloadInfo:
    return WorkloadInfo(w.tasks, w.slots, w.median, w.sigma, w.seed, w.time_scale)


def figures_from_results(
    polling: Results,
    callbacks: Mapping[str, Mapping[str, Any]] | None = None,
    callbacks_workload: Any = None,
) -> Figures:
    """The figures of a run in this process: what ``polling.run`` (and ``callbacks.run``)
    returned, the very numbers their lines printed."""
    if not polling.contenders:
        raise PlotInputError("no polling contender ran: nothing to plot")
    if not polling.curve:
        raise PlotInputError("the polling suite traced no bound curve: nothing to plot")
    return Figures(
        workload=_info(polling.workload),
        contenders=tuple(
            Contender(name, r["lag_mean_s"], r["polls_per_task"], r["makespan_over_oracle"])
            for name, r in polling.contenders.items()
        ),
        curve=tuple((p.lag_mean_s, p.polls_per_task) for p in polling.curve),
        bounds=dict(polling.bounds),
        callbacks={n: float(r["makespan_over_oracle"]) for n, r in (callbacks or {}).items()},
        callbacks_workload=None if callbacks_workload is None else _info(callbacks_workload),
    )


# --- From printed lines -------------------------------------------------------------------


class _Line:
    """One printed line, ``NAME key=value ...``, whose fields are read with checks."""

    def __init__(self, source: str, number: int, text: str) -> None:
        self.where = f"{source} line {number}"
        self.text = text
        words = text.split()
        self.name = words[0]
        self.fields: dict[str, str] = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise self.error(f"{word!r} is not a key=value field")
            self.fields[key] = value

    def error(self, message: str) -> PlotInputError:
        shown = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return PlotInputError(f"{self.where} ({self.name}): {message}\n  {shown}")

    def text_field(self, key: str) -> str:
        value = self.fields.get(key)
        if value is None:
            raise self.error(f"field {key!r} is missing")
        if not value:
            raise self.error(f"field {key!r} is empty")
        return value

    def number(self, key: str) -> float:
        value = self.text_field(key)
        try:
            number = float(value)
        except ValueError:
            raise self.error(f"field {key}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise self.error(f"field {key}={value!r} is not a finite number")
        return number

    def integer(self, key: str) -> int:
        value = self.text_field(key)
        try:
            return int(value)
        except ValueError:
            raise self.error(f"field {key}={value!r} is not an integer") from None

    def workload(self) -> WorkloadInfo:
        return WorkloadInfo(
            tasks=self.integer("tasks"),
            slots=self.integer("slots"),
            median_s=self.number("median_s"),
            sigma=self.number("sigma"),
            seed=self.integer("seed"),
            time_scale=self.number("time_scale"),
        )


def figures_from_lines(lines: Iterable[str], source: str = "<lines>") -> Figures:
    """The figures in the lines a run printed; :class:`PlotInputError` names the line and the
    field when one the plot needs is missing or garbled."""
    workload: WorkloadInfo | None = None
    callbacks_workload: WorkloadInfo | None = None
    contenders: dict[str, Contender] = {}
    curve: list[tuple[float, float]] = []
    bounds: dict[str, tuple[float, float]] = {}
    callbacks: dict[str, float] = {}
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        name = text.split(maxsplit=1)[0] if text else ""
        if name not in (
            "polling_workload",
            "polling",
            "polling_bound_curve",
            "polling_bound",
            "callbacks_workload",
            "callbacks",
            "callbacks-terminal",
        ):
            continue  # other suites' lines, blank lines, whatever else the file holds
        line = _Line(source, number, text)
        if name == "polling_workload":
            if workload is not None:
                raise line.error("a second polling_workload line: keep one run per file")
            workload = line.workload()
        elif name == "callbacks_workload":
            if callbacks_workload is not None:
                raise line.error("a second callbacks_workload line: keep one run per file")
            callbacks_workload = line.workload()
        elif name == "polling" and "contender" in line.fields:
            contender = line.text_field("contender")
            if contender in contenders:
                raise line.error(f"contender {contender!r} again: keep one run per file")
            contenders[contender] = Contender(
                contender,
                line.number("lag_mean_s"),
                line.number("polls_per_task"),
                line.number("makespan_over_oracle"),
            )
        elif name == "polling_bound_curve":
            curve.append((line.number("lag_mean_s"), line.number("polls_per_task")))
        elif name == "polling_bound":
            bounds[line.text_field("contender")] = (
                line.number("known_distribution_lag_mean_s"),
                line.number("known_distribution_polls_per_task"),
            )
        else:  # the callbacks suite: callbacks, callbacks-terminal, polling (no contender)
            if name in callbacks:
                raise line.error(f"the callbacks suite's {name!r} again: keep one run per file")
            callbacks[name] = line.number("makespan_over_oracle")
    if workload is None:
        raise PlotInputError(
            f"{source}: no polling_workload line (python -m benchmarks polling prints one first)"
        )
    if not contenders:
        raise PlotInputError(f"{source}: no 'polling contender=...' line")
    if not curve:
        raise PlotInputError(
            f"{source}: no polling_bound_curve line (printed after the polling suite's contenders)"
        )
    if callbacks_workload is not None and (
        (callbacks_workload.tasks, callbacks_workload.slots, callbacks_workload.seed)
        != (workload.tasks, workload.slots, workload.seed)
    ):
        raise PlotInputError(
            f"{source}: the callbacks suite ran another workload than the polling suite "
            "(tasks, slots or seed differ): keep one run per file"
        )
    return Figures(
        workload, tuple(contenders.values()), tuple(curve), bounds, callbacks, callbacks_workload
    )


def figures_from_file(path: Path) -> Figures:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlotInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return figures_from_lines(text.splitlines(), str(path))


# --- Drawing ------------------------------------------------------------------------------


def _group(name: str) -> str:
    if name in SDK_CONTENDERS:
        return "sdk"
    if name == "kling_async_list_sweep":
        return "sweep"
    return "fixed"


def _title(figures: Figures) -> str:
    w = figures.workload
    title = (
        f"Polling benchmark: {w.tasks} tasks on {w.slots} slots, log-normal durations "
        f"(median {w.median_s:g} s, sigma {w.sigma:g}), seed {w.seed}, "
        f"emulator clock {1 / w.time_scale:g}x"
    )
    if figures.callbacks_workload is not None:
        title += f" (callbacks suite: {1 / figures.callbacks_workload.time_scale:g}x)"
    return title


def _overlap(a: Bbox, b: Bbox) -> float:
    width = float(min(a.x1, b.x1) - max(a.x0, b.x0))
    height = float(min(a.y1, b.y1) - max(a.y0, b.y0))
    return max(0.0, width) * max(0.0, height)


def _xy(points: Any) -> list[tuple[float, float]]:
    """(x, y) pairs of an array of points (a line's data, or that data in pixels)."""
    import numpy as np

    return [(float(x), float(y)) for x, y in np.asarray(points, dtype=float).reshape(-1, 2)]


#: Label offsets tried in turn (points from the marker): beside it, then above or below it,
#: then farther out (with a leader line).
_OFFSETS: tuple[tuple[float, float, str], ...] = (
    (9, 4, "left"),
    (9, -13, "left"),
    (-9, 4, "right"),
    (-9, -13, "right"),
    (0, 10, "center"),
    (0, -20, "center"),
    (22, 16, "left"),
    (22, -28, "left"),
    (-22, 16, "right"),
    (-22, -28, "right"),
    (40, 0, "left"),
    (-40, 0, "right"),
    (0, 30, "center"),
    (0, -40, "center"),
)


def _place_labels(ax: Axes, renderer: RendererBase, labels: list[tuple[str, float, float]]) -> None:
    """Annotate each point with its name where the label overlaps no other label, no marker
    and stays inside the axes (the first such of ``_OFFSETS``; else the least overlapping)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    frame = ax.get_window_extent(renderer)
    markers = []
    for _, x, y in labels:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - 6, py - 6, px + 6, py + 6))
    for line in ax.get_lines():  # the bound's curve, every 4 px, so no label lies on it
        if line.get_gid() == "curve":
            drawn = _xy(ax.transData.transform(_xy(line.get_xydata())))
            for (x0, y0), (x1, y1) in itertools.pairwise(drawn):
                steps = max(1, int(math.hypot(x1 - x0, y1 - y0) / 4))
                for k in range(steps + 1):
                    px, py = x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps
                    markers.append(Bbox.from_extents(px - 2, py - 2, px + 2, py + 2))
    placed: list[Bbox] = []
    for text, x, y in labels:
        best = None
        for dx, dy, align in _OFFSETS:
            far = abs(dx) > 12 or abs(dy) > 14
            annotation = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=align,
                va="bottom",
                fontsize=FONT_SIZE - 1,
                arrowprops=(
                    {"arrowstyle": "-", "color": "0.55", "lw": 0.7, "shrinkB": 5} if far else None
                ),
                annotation_clip=False,
            )
            annotation.update_positions(renderer)
            box = Text.get_window_extent(annotation, renderer).padded(2)  # the text alone
            outside = box.width * box.height - _overlap(box, frame)
            cost = outside * 10 + sum(_overlap(box, b) for b in placed + markers)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, annotation, box)
            else:
                annotation.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[2])


def draw(figures: Figures, path: Path) -> Series:
    """Draw ``figures`` into the PNG ``path``; return the series read back from the plot."""
    require_matplotlib()
    import matplotlib

    # The Agg canvas, given to this figure alone: no interactive backend, no pyplot state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plotted = series(figures)
    with matplotlib.rc_context({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1}):
        fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI, layout="constrained")
        canvas = FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, width_ratios=(1.45, 1))
        fig.suptitle(_title(figures), fontsize=FONT_SIZE + 1)

        # Left: polls per task against mean lag, with the bound traced across lag weights.
        lags = [lag for lag, _ in plotted.points.values()]
        polls = [p for _, p in plotted.points.values()]
        x_max = max(lags) * 1.45
        curve = [(lag, p) for lag, p in plotted.curve]
        left.plot(
            [lag for lag, _ in curve],
            [p for _, p in curve],
            color="0.45",
            lw=1.8,
            marker=".",
            ms=5,
            gid="curve",
            zorder=1,
        )
        for name, (lag, p) in plotted.points.items():
            group = _group(name)
            left.plot(
                [lag],
                [p],
                linestyle="none",
                marker="o" if group != "fixed" else "s",
                ms=8,
                color=COLOURS[group],
                gid=f"point:{name}",
                zorder=3,
            )
            if name in plotted.bounds:
                bound_lag, bound_polls = plotted.bounds[name]
                left.plot(
                    [lag, bound_lag],
                    [p, bound_polls],
                    color=COLOURS[group],
                    lw=1,
                    ls=":",
                    zorder=2,
                )
                left.plot(
                    [bound_lag],
                    [bound_polls],
                    linestyle="none",
                    marker="o",
                    ms=6,
                    mfc="white",
                    color=COLOURS[group],
                    gid=f"bound:{name}",
                    zorder=2,
                )
        left.set_yscale("log")
        y_low = min([*polls, *(p for lag, p in curve if lag <= x_max)]) / 1.5
        left.set_ylim(y_low, max(polls) * 1.6)
        left.set_xlim(0, x_max)
        left.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        left.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        left.yaxis.set_minor_formatter(NullFormatter())
        left.set_xlabel("mean detection lag (s, emulated: first terminal poll minus completion)")
        left.set_ylabel("status requests per task (GETs and list pages, log scale)")
        left.set_title("Polls against lag: lower left is better")
        left.grid(True, which="major", alpha=0.3)
        present = {_group(name) for name in plotted.points}
        handles = [
            Line2D([], [], color=COLOURS[group], marker=marker, ls="none", label=label)
            for group, marker, label in (
                ("sdk", "o", "kling_async (the SDK)"),
                ("sweep", "o", "list sweeps (SDK)"),
                ("fixed", "s", "hand-written loops"),
            )
            if group in present
        ]
        handles += [
            Line2D(
                [],
                [],
                color="0.45",
                marker=".",
                lw=1.8,
                label="optimal schedule, true distribution\n(across lag weights; one GET a look)",
            ),
        ]
        if plotted.bounds:
            handles.append(
                Line2D(
                    [],
                    [],
                    color=COLOURS["sdk"],
                    marker="o",
                    mfc="white",
                    ls=":",
                    lw=1,
                    label="that optimum at the SDK's lag",
                )
            )
        left.legend(handles=handles, loc="upper right", fontsize=FONT_SIZE - 1, framealpha=0.9)

        # Right: makespan over the zero-lag oracle, one dot per contender, top to bottom.
        rows = list(plotted.makespan)
        ys = list(range(len(rows)))[::-1]
        n_polling = len(figures.contenders)
        for i, ((label, ratio), y) in enumerate(zip(rows, ys, strict=True)):
            colour = COLOURS["callbacks"] if i >= n_polling else COLOURS[_group(label)]
            right.hlines(y, 1.0, ratio, color=colour, lw=2.5, alpha=0.6)
            right.plot([ratio], [y], "o", ms=8, color=colour, gid=f"makespan:{label}")
            right.annotate(
                f"{ratio:.3f}",
                (ratio, y),
                xytext=(7, 0),
                textcoords="offset points",
                va="center",
                fontsize=FONT_SIZE - 1,
            )
        if len(rows) > n_polling:
            right.axhline(ys[n_polling - 1] - 0.5, color="0.6", lw=0.8, ls="--")
            scale = figures.callbacks_workload
            right.text(
                0.99,
                (ys[n_polling - 1] - 0.5 + 0.15),
                "callbacks suite (FastAPI app"
                + (f", clock {1 / scale.time_scale:g}x)" if scale else ")"),
                transform=right.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=FONT_SIZE - 2,
                color="0.35",
            )
        worst = max(ratio for _, ratio in rows)
        right.set_xlim(0.997, max(worst, MAKESPAN_TARGET) + 0.22 * (max(worst, 1.01) - 0.997))
        right.set_ylim(-0.7, len(rows) - 0.3)
        right.set_yticks(ys, [label for label, _ in rows])
        right.axvline(1.0, color="0.2", lw=1)
        right.axvline(MAKESPAN_TARGET, color="0.5", lw=1, ls=":")
        right.set_xlabel("makespan / the zero-lag oracle's makespan (lower is better)")
        right.set_title(f"Makespan over the zero-lag oracle (dotted: target {MAKESPAN_TARGET:g})")
        right.grid(True, axis="x", alpha=0.3)

        # Fix the layout, then label the points where the labels fit.
        canvas.draw()  # type: ignore[no-untyped-call]
        fig.set_layout_engine("none")
        renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]
        _place_labels(left, renderer, [(n, lag, p) for n, (lag, p) in plotted.points.items()])
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=DPI)
    return _read_back(left, right)


def _read_back(left: Axes, right: Axes) -> Series:
    """The series as the plot holds them (its artists' data), so a test sees what was drawn."""
    points: dict[str, tuple[float, float]] = {}
    bounds: dict[str, tuple[float, float]] = {}
    curve: tuple[tuple[float, float], ...] = ()
    for line in left.get_lines():
        gid = line.get_gid() or ""
        xy = _xy(line.get_xydata())
        if gid == "curve":
            curve = tuple(xy)
        elif gid.startswith("point:"):
            points[gid.removeprefix("point:")] = xy[0]
        elif gid.startswith("bound:"):
            bounds[gid.removeprefix("bound:")] = xy[0]
    dots = [
        (line.get_gid() or "", _xy(line.get_xydata())[0])
        for line in right.get_lines()
        if line.get_gid()
    ]
    dots.sort(key=lambda d: -d[1][1])  # top to bottom
    makespan = tuple((gid.removeprefix("makespan:"), xy[0]) for gid, xy in dots)
    return Series(points=points, curve=curve, bounds=bounds, makespan=makespan)
