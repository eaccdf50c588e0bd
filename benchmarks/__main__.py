"""`python -m benchmarks [polling|scale|pool|hardening|decode|callbacks|workers ...] [--tasks N]`.

With no suite named, polling, scale, pool, hardening and decode run; callbacks and workers are
opt-in (callbacks serves a FastAPI app per contender, workers runs worker processes sharing one
account through a redis-server; each takes a few minutes, see ``benchmarks/callbacks.py`` and
``benchmarks/workers.py``).
"""

from __future__ import annotations

import argparse

from . import callbacks, decode, hardening, polling, pool, scale, workers

SUITES = ("polling", "scale", "pool", "hardening", "decode", "callbacks", "workers")
DEFAULT_SUITES = ("polling", "scale", "pool", "hardening", "decode")


def main() -> None:
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
    args = parser.parse_args()
    suites = args.suites or list(DEFAULT_SUITES)
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}: choose {', '.join(SUITES)}")
    if "polling" in suites:
        workload = polling.Workload(
            tasks=args.tasks,
            slots=args.slots,
            time_scale=polling.DEFAULT_TIME_SCALE if args.time_scale is None else args.time_scale,
            seed=args.seed,
        )
        polling.run(workload, args.contender)
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
        callbacks.run(workload, only or None)
    if "workers" in suites:
        workload = polling.Workload(
            tasks=args.tasks,
            slots=args.slots,
            time_scale=workers.DEFAULT_TIME_SCALE if args.time_scale is None else args.time_scale,
            seed=args.seed,
        )
        only = [c for c in args.contender or () if c in workers.CONTENDERS]
        workers.run(workload, only or None)


if __name__ == "__main__":
    main()
