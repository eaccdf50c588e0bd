"""Polling cost and detection lag, this SDK against fixed-interval pollers, one workload.

Every contender gets a fresh emulator process with the same seed: log-normal task durations
(median 90 s before scaling), an account limit of K parallel tasks, and N tasks to run. Printed
per contender: requests and polls per task, mean and p95 detection lag (first terminal
observation minus server completion, in unscaled seconds), makespan over the lower bound
max(max d, sum d / K), 1303 answers and client CPU (user and system) per request.
"""

from __future__ import annotations

import asyncio
import bisect
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


@attrs.frozen
class Run:
    observed: dict[str, float]  # task_id -> monotonic time of the first terminal observation
    started: float
    ended: float
    cpu_user: float
    cpu_system: float


def _cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process (the emulator runs in another one).

    Loopback TCP work of both ends is billed as system time to whoever sends, so user time is
    the fair measure of the client's own cost.
    """
    times = os.times()
    return times.user, times.system


def _run(observed: dict[str, float], started: float, cpu: tuple[float, float]) -> Run:
    user, system = _cpu()
    return Run(observed, started, time.monotonic(), user - cpu[0], system - cpu[1])


async def _sdk(emu: EmulatorProcess, w: Workload, *, official: bool, known_limit: bool) -> Run:
    credentials = (
        {"access_key": emu.access_key, "secret_key": emu.secret_key}
        if official
        else {"api_key": emu.api_key}
    )
    cpu = _cpu()
    started = time.monotonic()
    async with ka.KlingClient(
        base_url=emu.url,
        poll=ka.PollPolicy().scaled(w.time_scale),
        max_active_tasks=w.slots if known_limit else None,
        max_requests_per_second=None,
        **credentials,  # type: ignore[arg-type]
    ) as kling:
        jobs = kling.submit_many(w.requests())
        observed: dict[str, float] = {}
        # as_completed yields each job in the same step the pollers saw it end.
        async for job in kling.as_completed(jobs):
            if job.task_id is not None:
                observed[job.task_id] = time.monotonic()
    return _run(observed, started, cpu)


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


def bound(w: Workload, durations: list[float]) -> None:
    """What no poller doing one GET per look can beat by much: the optimal inspection schedule
    for the *true* distribution (which the SDK has to learn), against 6 s polling, both
    evaluated on the durations the emulator drew in this run, with no network in the way."""
    policy = ka.PollPolicy()
    plan = inspection_schedule(
        w.median,
        w.sigma,
        lag_per_poll=policy.effective_lag_per_poll,
        min_interval=policy.min_interval,
        max_interval=policy.max_interval,
    )
    polls = lags = fixed_polls = fixed_lags = 0.0
    for d in durations:
        k = bisect.bisect_left(plan, d)
        polls += k + 1 if k < len(plan) else len(plan) + math.ceil((d - plan[-1]) / 60)
        lags += (plan[k] if k < len(plan) else d) - d
        n = math.ceil(d / 6.0)
        fixed_polls, fixed_lags = fixed_polls + n, fixed_lags + n * 6.0 - d
    n = len(durations)
    print(
        f"polling_bound known_distribution_polls_per_task={polls / n:.3f} "
        f"known_distribution_lag_mean_s={lags / n:.3f} "
        f"fixed_6s_polls_per_task={fixed_polls / n:.3f} "
        f"fixed_6s_lag_mean_s={fixed_lags / n:.3f} polls_ratio={polls / fixed_polls:.3f} "
        f"lag_ratio={lags / fixed_lags:.3f}",
        flush=True,
    )


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
    result = {
        "tasks": n,
        "requests_per_task": requests / n,
        "polls_per_task": polls / n,
        "lag_mean_s": statistics.fmean(lags),
        "lag_p95_s": _percentile(lags, 0.95),
        "makespan_ratio": makespan / bound,
        "n1303": stats["sent_1303"],
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
    "kling_async": lambda emu, w: _sdk(emu, w, official=False, known_limit=True),
    "kling_async_unknown_limit": lambda emu, w: _sdk(emu, w, official=False, known_limit=False),
    "kling_async_list_sweep": lambda emu, w: _sdk(emu, w, official=True, known_limit=True),
    "naive_semaphore_5s": lambda emu, w: _fixed(emu, w, lambda: 5.0),
    "fixed_6s_jitter": lambda emu, w: _fixed(emu, w, lambda: random.uniform(4.5, 7.5)),
    "fixed_1s": lambda emu, w: _fixed(emu, w, lambda: 1.0),
}


def run(w: Workload, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    results = {}
    durations: list[float] = []
    for name, contender in CONTENDERS.items():
        if only and name not in only:
            continue
        with w.emulator() as emu:
            outcome: Run = asyncio.run(contender(emu, w))  # type: ignore[arg-type]
            results[name], durations = _report(name, w, emu, outcome)
    if durations:
        bound(w, durations)
    base = results.get("fixed_6s_jitter")
    ours = results.get("kling_async")
    if base and ours:
        print(
            "polling_vs_fixed_6s "
            f"polls_ratio={ours['polls_per_task'] / base['polls_per_task']:.3f} "
            f"lag_ratio={ours['lag_mean_s'] / base['lag_mean_s']:.3f} "
            f"requests_ratio={ours['requests_per_task'] / base['requests_per_task']:.3f}",
            flush=True,
        )
    return results
