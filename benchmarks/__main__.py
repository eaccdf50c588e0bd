"""`python -m benchmarks [polling|scale|pool|hardening|decode|callbacks|workers ...] [--tasks N]`.

With no suite named, polling, scale, pool, hardening and decode run; callbacks and workers are
opt-in (callbacks serves a FastAPI app per contender, workers runs worker processes sharing one
account through a redis-server; each takes a few minutes, see ``benchmarks/callbacks.py`` and
``benchmarks/workers.py``).

``--plot`` draws the polling figure the docs show (``benchmarks/plot.py``) from the run's own
results; ``--plot-from FILE`` draws it from the lines a run printed, running nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import callbacks, decode, hardening, plot, polling, pool, scale, workers

SUITES = ("polling", "scale", "pool", "hardening", "decode", "callbacks", "workers")
DEFAULT_SUITES = ("polling", "scale", "pool", "hardening", "decode")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "suites", nargs="*", help=f"{', '.join(SUITES)} (default: all but callbacks and workers)"
    )
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help=f"default: {polling.DEFAULT_TIME_SCALE} for polling, "
        f"{callbacks.DEFAULT_TIME_SCALE} for callbacks, {workers.DEFAULT_TIME_SCALE} for workers",
    )
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--contender",
        action="append",
        help="run only these contenders: polling's, or callbacks' "
        f"{', '.join(callbacks.CONTENDERS)}, or workers' {', '.join(workers.CONTENDERS)} "
        "(callbacks and workers run all of their own if none of theirs is named)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--case", action="append", choices=sorted(hardening.CASES), help="hardening cases to run"
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="draw the polling suite's figure from this run (needs matplotlib: the [bench] extra)",
    )
    parser.add_argument(
        "--plot-from",
        type=Path,
        metavar="FILE",
        help="draw the figure from the lines a run printed into FILE; runs nothing",
    )
    parser.add_argument(
        "--plot-file",
        type=Path,
        metavar="PATH",
        help="the PNG --plot or --plot-from writes (default: docs/img/benchmark-polling.png "
        "in the repository)",
    )
    args = parser.parse_args(argv)
    target: Path = args.plot_file or plot.DEFAULT_PATH
    if args.plot_file is not None and not (args.plot or args.plot_from):
        parser.error("--plot-file goes with --plot or --plot-from")
    if args.plot_from is not None:
        if args.suites:
            parser.error("--plot-from draws from a saved run and runs nothing: name no suite")
        try:
            _draw(plot.figures_from_file(args.plot_from), target)
        except plot.PlotError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        return
    suites = args.suites or list(DEFAULT_SUITES)
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}: choose {', '.join(SUITES)}")
    if args.plot:
        if "polling" not in suites:
            parser.error("--plot draws the polling suite's figures: run it (polling --plot)")
        try:
            plot.require_matplotlib()  # before minutes of benchmarks, not after them
        except plot.PlotError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
    polled: polling.Results | None = None
    pushed: dict[str, dict[str, Any]] | None = None
    pushed_workload: polling.Workload | None = None
    if "polling" in suites:
        workload = polling.Workload(
            tasks=args.tasks,
            slots=args.slots,
            time_scale=polling.DEFAULT_TIME_SCALE if args.time_scale is None else args.time_scale,
            seed=args.seed,
        )
        polled = polling.run(workload, args.contender)
    if "scale" in suites:
        scale.run(args.sizes)
    if "pool" in suites:
        pool.run()
    if "hardening" in suites:
        hardening.run(args.case)
    if "decode" in suites:
        decode.run()
    if "callbacks" in suites:
        workload = polling.Workload(
            tasks=args.tasks,
            slots=args.slots,
            time_scale=(
                callbacks.DEFAULT_TIME_SCALE if args.time_scale is None else args.time_scale
            ),
            seed=args.seed,
        )
        only = [c for c in args.contender or () if c in callbacks.CONTENDERS]
        pushed = callbacks.run(workload, only or None)
        pushed_workload = workload
    if "workers" in suites:
        workload = polling.Workload(
            tasks=args.tasks,
            slots=args.slots,
            time_scale=workers.DEFAULT_TIME_SCALE if args.time_scale is None else args.time_scale,
            seed=args.seed,
        )
        only = [c for c in args.contender or () if c in workers.CONTENDERS]
        workers.run(workload, only or None)
    if args.plot and polled is not None:
        try:
            _draw(plot.figures_from_results(polled, pushed, pushed_workload), target)
        except plot.PlotError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _draw(figures: plot.Figures, target: Path) -> None:
    plot.draw(figures, target)
    print(f"wrote {target}", file=sys.stderr, flush=True)  # stdout keeps only result lines


if __name__ == "__main__":
    main()
