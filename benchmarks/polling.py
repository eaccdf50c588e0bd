"""Polling cost and detection lag, this SDK against fixed-interval pollers, one workload.

Every contender gets a fresh emulator process with the same seed: log-normal task durations
(median 90 s before scaling), an account limit of K parallel tasks, and N tasks to run. Printed
per contender: requests and polls per task, mean and p95 detection lag (first terminal
observation minus server completion, in unscaled seconds), makespan over the lower bound
max(max d, sum d / K) and over the zero-lag oracle (the same durations, in the order the
server created them, each started the moment a slot frees: what a client that noticed every
end at once and lost no time would reach), 1303 answers, the creates beyond one per task
(slot probes and the 1303s of learning the limit) and client CPU (user and system).

``kling_async_warm`` is the SDK again, started with the duration statistics the cold
``kling_async`` run saved (its job store's), as a second batch on the same account would be.
The ``polling_bound`` lines put the optimal inspection schedule for the *true* distribution
at each SDK contender's own mean lag, so polls are compared at equal lag; the
``polling_bound_curve`` lines trace that schedule's polls against its lag across lag weights
(``lag_per_poll``), and ``polling_workload`` says what ran: what ``python -m benchmarks
--plot`` (``benchmarks/plot.py``) draws, from this run or from its saved lines.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import attrs

import kling_async as ka
from kling_async.protocol.schedule import inspection_schedule

from ._harness import EmulatorProcess, TaskTruth

API_ROUTES = ("create", "get", "get_by_external_id", "list")
DEFAULT_TIME_SCALE = 0.02
#: The lag weights (``lag_per_poll``, seconds of lag a poll must save) the bound's curve is
#: traced at: 0.02 to 2.56 s in steps of sqrt(2), mean lags of about 0.9 s to 8 s (below that,
#: the schedule is at ``min_interval``: polls keep growing, lag hardly shrinks).
CURVE_LAG_WEIGHTS = tuple(0.02 * 2 ** (i / 2) for i in range(15))


@attrs.frozen
class Workload:
    tasks: int = 200
    slots: int = 20
    time_scale: float = DEFAULT_TIME_SCALE
    seed: int = 2026
    median: float = 90.0
    sigma: float = 0.35

    def emulator(self, **settings: Any) -> EmulatorProcess:
        """The workload's emulator; ``settings`` add emulator knobs (``callbacks=...``)."""
        return EmulatorProcess(
            time_scale=self.time_scale,
            seed=self.seed,
            median_duration=self.median,
            duration_sigma=self.sigma,
            concurrency_limit=self.slots,
            **settings,
        )

    def requests(self) -> list[ka.Text2VideoRequest]:
        return [ka.Text2VideoRequest(prompt=f"benchmark clip {i}") for i in range(self.tasks)]

    def describe(self, name: str) -> None:
        """Print the workload as one line (``NAME tasks=... seed=...``), for the plot's title."""
        print(
            f"{name} tasks={self.tasks} slots={self.slots} median_s={self.median:.3f} "
            f"sigma={self.sigma:.3f} seed={self.seed} time_scale={self.time_scale:.4f}",
            flush=True,
        )


@attrs.frozen
class Run:
    observed: dict[str, float]  # task_id -> monotonic time of the first terminal observation
    started: float
    ended: float
    cpu_user: float
    cpu_system: float
    client: ka.ClientStats | None = None  # the SDK's own counters (None for hand-written loops)


def _cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process (the emulator runs in another one).

    Loopback TCP work of both ends is billed as system time to whoever sends, so user time is
    the fair measure of the client's own cost.
    """
    times = os.times()
    return times.user, times.system


def _run(
    observed: dict[str, float],
    started: float,
    cpu: tuple[float, float],
    client: ka.ClientStats | None = None,
) -> Run:
    user, system = _cpu()
    return Run(observed, started, time.monotonic(), user - cpu[0], system - cpu[1], client)


#: The duration statistics the cold run left in its store, for the warm run (one process).
_SAVED: dict[str, ka.MemoryJobStore] = {}


async def _sdk(
    emu: EmulatorProcess,
    w: Workload,
    *,
    official: bool,
    known_limit: bool,
    save_as: str | None = None,
    warm_from: str | None = None,
) -> Run:
    credentials = (
        {"access_key": emu.access_key, "secret_key": emu.secret_key}
        if official
        else {"api_key": emu.api_key}
    )
    store = ka.MemoryJobStore()
    if warm_from is not None:
        saved = _SAVED.get(warm_from)
        if saved is None:
            raise SystemExit(f"the warm contender needs {warm_from!r} to run before it")
        await store.save_durations(await saved.load_durations())  # the statistics, no jobs
    cpu = _cpu()
    started = time.monotonic()
    async with ka.KlingClient(
        base_url=emu.url,
        poll=ka.PollPolicy().scaled(w.time_scale),
        max_active_tasks=w.slots if known_limit else None,
        max_requests_per_second=None,
        store=store,
        **credentials,  # type: ignore[arg-type]
    ) as kling:
        jobs = kling.submit_many(w.requests())
        observed: dict[str, float] = {}
        # as_completed yields each job in the same step the pollers saw it end.
        async for job in kling.as_completed(jobs):
            if job.task_id is not None:
                observed[job.task_id] = time.monotonic()
        ended = _run(observed, started, cpu, kling.stats)
    if save_as is not None:
        _SAVED[save_as] = store
    return ended


async def _fixed(emu: EmulatorProcess, w: Workload, interval: Callable[[], float]) -> Run:
    """What people write by hand: a semaphore of K, gather, sleep a fixed interval, GET."""
    observed: dict[str, float] = {}
    semaphore = asyncio.Semaphore(w.slots)
    cpu = _cpu()
    started = time.monotonic()
    async with ka.KlingClient(
        api_key=emu.api_key, base_url=emu.url, max_requests_per_second=None
    ) as kling:

        async def one(request: ka.Text2VideoRequest) -> None:
            async with semaphore:
                task = await kling.text2video.create(request)
                while True:
                    await asyncio.sleep(interval() * w.time_scale)
                    task = await kling.text2video.get(task.task_id)
                    if task.is_terminal:
                        observed[task.task_id] = time.monotonic()
                        return

        await asyncio.gather(*(one(r) for r in w.requests()))
    return _run(observed, started, cpu)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _known_distribution(
    w: Workload, durations: list[float], lag_per_poll: float
) -> tuple[float, float]:
    """(polls per task, mean lag) of the optimal inspection schedule for the true
    distribution, evaluated on ``durations`` with no network in the way."""
    policy = ka.PollPolicy()
    plan = inspection_schedule(
        w.median,
        w.sigma,
        lag_per_poll=lag_per_poll,
        min_interval=policy.min_interval,
        max_interval=policy.max_interval,
    )
    polls = lags = 0.0
    for d in durations:
        k = bisect.bisect_left(plan, d)
        if k < len(plan):
            polls, lags = polls + k + 1, lags + plan[k] - d
        else:
            extra = math.ceil((d - plan[-1]) / policy.max_interval)
            polls += len(plan) + extra
            lags += plan[-1] + extra * policy.max_interval - d
    return polls / len(durations), lags / len(durations)


#: Draws of the true distribution the bound is evaluated on (see :func:`reference_durations`).
REFERENCE_DRAWS = 20_000


def reference_durations(w: Workload) -> list[float]:
    """The true distribution, as many seeded draws: the bound is its expectation. On a run's
    200 durations the schedule's mean lag has a sampling error of about 0.15 s and is not
    even monotone in the lag weight, so the bound at a given lag jumped by up to 8% between
    nearly equal lags; on 20,000 draws its curve is smooth and its error about 0.01 s."""
    rng = random.Random(w.seed)
    return [rng.lognormvariate(math.log(w.median), w.sigma) for _ in range(REFERENCE_DRAWS)]


def bound(
    w: Workload, durations: list[float], name: str, lag: float, polls: float
) -> tuple[float, float]:
    """What no poller doing one GET per look can beat by much: the optimal inspection schedule
    for the *true* distribution (which the SDK has to learn), tuned to the mean lag ``lag``
    the contender ``name`` reached (so the two are compared at equal lag), evaluated on
    ``durations`` (the suite passes :func:`reference_durations`)."""
    lo, hi = 1e-3, 1e3  # lag_per_poll: the bound's lag grows with it (in steps: a grid)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if _known_distribution(w, durations, mid)[1] < lag:
            lo = mid
        else:
            hi = mid
    # The two schedules either side of the lag, interpolated to it exactly.
    (polls_lo, lag_lo), (polls_hi, lag_hi) = (
        _known_distribution(w, durations, lo),
        _known_distribution(w, durations, hi),
    )
    share = 0.0 if lag_hi == lag_lo else (lag - lag_lo) / (lag_hi - lag_lo)
    bound_polls = polls_lo + share * (polls_hi - polls_lo)
    bound_lag = lag_lo + share * (lag_hi - lag_lo)
    print(
        f"polling_bound contender={name} lag_mean_s={lag:.3f} polls_per_task={polls:.3f} "
        f"known_distribution_polls_per_task={bound_polls:.3f} "
        f"known_distribution_lag_mean_s={bound_lag:.3f} "
        f"polls_over_bound={polls / bound_polls:.3f}",
        flush=True,
    )
    return bound_lag, bound_polls


@attrs.frozen
class CurvePoint:
    """The optimal schedule for the true distribution at one lag weight."""

    lag_per_poll: float
    lag_mean_s: float
    polls_per_task: float


def bound_curve(w: Workload, durations: list[float]) -> list[CurvePoint]:
    """The bound's polls against its lag, one point per lag weight in ``CURVE_LAG_WEIGHTS``;
    each printed as a ``polling_bound_curve`` line."""
    curve = []
    for weight in CURVE_LAG_WEIGHTS:
        polls, lag = _known_distribution(w, durations, weight)
        curve.append(CurvePoint(weight, lag, polls))
        print(
            f"polling_bound_curve lag_per_poll={weight:.4f} lag_mean_s={lag:.3f} "
            f"polls_per_task={polls:.3f}",
            flush=True,
        )
    return curve


def oracle_makespan(truth: list[TaskTruth], slots: int) -> float:
    """The zero-lag oracle: the run's durations, in the order the server created them, each
    started the moment one of ``slots`` frees (greedy list scheduling)."""
    free = [0.0] * slots
    end = 0.0
    for task in sorted(truth, key=lambda t: t.created_at):
        start = heapq.heappop(free)
        finish = start + task.completes_at - task.created_at
        end = max(end, finish)
        heapq.heappush(free, finish)
    return end


def _report(
    name: str, w: Workload, emu: EmulatorProcess, run: Run
) -> tuple[dict[str, float], list[float]]:
    """Print the contender's line; return its figures and the run's true durations."""
    stats = emu.stats()
    truth: list[TaskTruth] = emu.tasks()
    by_id = {t.task_id: t for t in truth}
    lags = [emu.emulated(seen) - by_id[tid].completes_at for tid, seen in run.observed.items()]
    durations = [t.completes_at - t.created_at for t in truth]
    bound = max(max(durations), sum(durations) / w.slots)
    makespan = emu.emulated(run.ended) - emu.emulated(run.started)
    routes = stats["requests_per_route"]
    requests = sum(routes.get(r, 0) for r in API_ROUTES)
    polls = routes.get("get", 0) + routes.get("list", 0)
    n = len(truth)
    client = run.client
    result = {
        "tasks": n,
        "requests_per_task": requests / n,
        "polls_per_task": polls / n,
        "lag_mean_s": statistics.fmean(lags),
        "lag_p95_s": _percentile(lags, 0.95),
        "makespan_ratio": makespan / bound,
        "makespan_over_oracle": makespan / oracle_makespan(truth, w.slots),
        "n1303": stats["sent_1303"],
        # Creates beyond one per task: slot probes and the 1303s of learning the limit.
        "extra_creates_per_task": (routes.get("create", 0) - n) / n,
        "probes_per_task": (client.slot_probes / n) if client else 0.0,
        "probe_1303_per_task": (client.slot_probes_refused / n) if client else 0.0,
        "cpu_user_us_per_request": run.cpu_user / max(1, requests) * 1e6,
        "cpu_system_us_per_request": run.cpu_system / max(1, requests) * 1e6,
        # Per request favours whoever sends more requests; per task is the fair comparison.
        "cpu_user_ms_per_task": run.cpu_user / n * 1e3,
        "max_tasks_per_external_id": stats["max_per_external_id"],
    }
    print(
        f"polling contender={name} "
        + " ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        ),
        flush=True,
    )
    return result, durations


CONTENDERS: dict[str, Callable[[EmulatorProcess, Workload], object]] = {
    "kling_async": lambda emu, w: _sdk(emu, w, official=False, known_limit=True, save_as="cold"),
    "kling_async_warm": lambda emu, w: _sdk(
        emu, w, official=False, known_limit=True, warm_from="cold"
    ),
    "kling_async_unknown_limit": lambda emu, w: _sdk(emu, w, official=False, known_limit=False),
    "kling_async_list_sweep": lambda emu, w: _sdk(emu, w, official=True, known_limit=True),
    "naive_semaphore_5s": lambda emu, w: _fixed(emu, w, lambda: 5.0),
    "fixed_6s_jitter": lambda emu, w: _fixed(emu, w, lambda: random.uniform(4.5, 7.5)),
    "fixed_1s": lambda emu, w: _fixed(emu, w, lambda: 1.0),
}


@attrs.frozen
class Results:
    """What the suite printed, for the plot: per contender its figures, and the bound's curve."""

    workload: Workload
    contenders: dict[str, dict[str, float]]
    #: contender -> (lag, polls) of the bound at its own lag (its ``polling_bound`` line)
    bounds: dict[str, tuple[float, float]]
    curve: list[CurvePoint]


def run(w: Workload, only: list[str] | None = None) -> Results:
    if only and "kling_async_warm" in only and "kling_async" not in only:
        only = ["kling_async", *only]  # the warm run starts from the cold run's statistics
    w.describe("polling_workload")
    results = {}
    durations: list[float] = []
    for name, contender in CONTENDERS.items():
        if only and name not in only:
            continue
        with w.emulator() as emu:
            outcome: Run = asyncio.run(contender(emu, w))  # type: ignore[arg-type]
            results[name], durations = _report(name, w, emu, outcome)
    bounds = {}
    reference = reference_durations(w)
    for name, result in results.items():
        if name.startswith("kling_async") and name != "kling_async_list_sweep":
            bounds[name] = bound(w, reference, name, result["lag_mean_s"], result["polls_per_task"])
    base = results.get("fixed_6s_jitter")
    for name in ("kling_async", "kling_async_warm", "kling_async_unknown_limit"):
        ours = results.get(name)
        if base and ours:
            print(
                f"polling_vs_fixed_6s contender={name} "
                f"polls_ratio={ours['polls_per_task'] / base['polls_per_task']:.3f} "
                f"lag_ratio={ours['lag_mean_s'] / base['lag_mean_s']:.3f} "
                f"requests_ratio={ours['requests_per_task'] / base['requests_per_task']:.3f} "
                f"makespan_over_oracle={ours['makespan_over_oracle']:.3f}",
                flush=True,
            )
    curve = bound_curve(w, reference) if durations else []
    return Results(w, results, bounds, curve)
