"""`python -m benchmarks [polling|scale|hardening|decode ...] [--tasks N] [--slots K] ...`."""

from __future__ import annotations

import argparse

from . import decode, hardening, polling, scale


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "suites", nargs="*", help="polling, scale, hardening, decode (default: all)"
    )
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--time-scale", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--contender", action="append", help="run only these polling contenders")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--case", action="append", choices=sorted(hardening.CASES), help="hardening cases to run"
    )
    args = parser.parse_args()
    suites = args.suites or ["polling", "scale", "hardening", "decode"]
    unknown = sorted(set(suites) - {"polling", "scale", "hardening", "decode"})
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}: choose polling, scale, hardening or decode")
    if "polling" in suites:
        workload = polling.Workload(
            tasks=args.tasks, slots=args.slots, time_scale=args.time_scale, seed=args.seed
        )
        polling.run(workload, args.contender)
    if "scale" in suites:
        scale.run(args.sizes)
    if "hardening" in suites:
        hardening.run(args.case)
    if "decode" in suites:
        decode.run()


if __name__ == "__main__":
    main()
