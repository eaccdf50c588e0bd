"""Scale: memory per tracked job and event-loop lag with 10,000 and 100,000 tracked jobs.

The emulator (another process) preloads long tasks; the client tracks them all, and the poller
pool gives every job its first snapshot (a list sweep: 500 tasks a request). Memory is measured
with tracemalloc in one run; event-loop lag (how late a 5 ms sleep wakes) in a separate run
without tracemalloc, whose own overhead would distort it.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

import kling_async as ka

from ._harness import EmulatorProcess


async def _track_all(
    emu: EmulatorProcess, ids: list[str], *, measure_memory: bool, window: float = 3.0
) -> dict[str, float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def monitor() -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - before - 0.005)

    gc.collect()
    if measure_memory:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if measure_memory else 0
    started = time.monotonic()
    async with ka.KlingClient(
        access_key=emu.access_key,
        secret_key=emu.secret_key,
        base_url=emu.url,
        max_requests_per_second=None,
        max_active_tasks=len(ids) + 1,
    ) as kling:
        watcher = asyncio.create_task(monitor())
        jobs = []
        for start in range(0, len(ids), 1000):  # as an app would: a chunk, then let others run
            jobs += [kling.track(task_id) for task_id in ids[start : start + 1000]]
            await asyncio.sleep(0)
        while any(job.task is None for job in jobs):
            await asyncio.sleep(0.05)
        settled = time.monotonic() - started
        # Keep the loop busy with the pool for a while: the lag is sampled over all of it.
        await asyncio.sleep(max(0.0, window - settled))
        gc.collect()
        used = (tracemalloc.get_traced_memory()[0] - base) if measure_memory else 0
        stats = kling.stats
        stop.set()
        await watcher
    if measure_memory:
        tracemalloc.stop()
    lags.sort()
    return {
        "bytes_per_job": used / len(ids),
        "loop_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000 if lags else 0.0,
        "loop_lag_max_ms": lags[-1] * 1000 if lags else 0.0,
        "seconds_to_first_snapshot": settled,
        "requests": float(stats.requests),
    }


def run(sizes: list[int]) -> None:
    for n in sizes:
        with EmulatorProcess(time_scale=1.0, median_duration=36_000.0) as emu:
            ids = emu.preload(n)
            lag = asyncio.run(_track_all(emu, ids, measure_memory=False))
            memory = asyncio.run(_track_all(emu, ids, measure_memory=True))
        print(
            f"scale tracked_jobs={n} bytes_per_job={memory['bytes_per_job']:.0f} "
            f"loop_lag_p99_ms={lag['loop_lag_p99_ms']:.2f} "
            f"loop_lag_max_ms={lag['loop_lag_max_ms']:.2f} "
            f"seconds_to_first_snapshot={lag['seconds_to_first_snapshot']:.2f} "
            f"requests={lag['requests']:.0f}",
            flush=True,
        )
