"""One worker process of the multi-process Redis tests (``tests/test_redis_workers.py``).

::

    python -m tests.redis_worker --base-url URL --api-key KEY --redis URL \\
        --batch w0:100 --expect w0:100 --expect w1:100 [options]

It opens a ``KlingClient`` on the shared account (``--redis none``: a client of its own, with
no Redis, for the one-process baseline), says ``ready``, waits for a ``go`` line on stdin
(unless ``--go``), submits its batch (ids ``PREFIX-0`` .. ``PREFIX-(N-1)``), waits for its
own jobs, then for every job of every ``--expect`` batch to end as this client sees it (its
own, adopted ones and the other workers' replicas), and exits 0. Stdout carries one JSON
object a line, for the test to read:

- ``{"e": "ready", "worker": ..., "pid": ...}``
- ``{"e": "owns", "n": ...}`` every 0.1 s: the unfinished jobs this worker follows now;
- ``{"e": "job", "id": ..., "status": ..., "task_id": ..., "own": bool, "t": unix time}``:
  each expected job, once, as this client first sees it ended (``own``: followed here, not a
  replica);
- ``{"e": "done", "t_go": ..., "t_own": ..., "t_all": ..., "stats": {...}}`` at the end
  (``t_own``: this worker's own batch ended; ``t_all``: every expected job seen ended);
- ``{"e": "timeout", "missing": {id: status}}`` (exit 2) when ``--deadline`` passes first.

An end of stdin (the test is gone) ends the process at once, so no worker outlives its test.
Logs (warnings and up) go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio

import kling_async as ka
from kling_async.redis import RedisAccount

#: As ``tests.conftest.FAST_RETRY`` (not imported: that would import pytest into the worker).
RETRY = ka.RetryPolicy(attempts=8, timeout=10.0, initial=0.01, maximum=0.1, throttle_minimum=0.01)


def _out(kind: str, **fields: Any) -> None:
    print(json.dumps({"e": kind, **fields}, separators=(",", ":")), flush=True)


def _batch(spec: str) -> tuple[str, int]:
    prefix, _, count = spec.rpartition(":")
    if not prefix or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected PREFIX:COUNT, got {spec!r}")
    return prefix, int(count)


def _ids(batches: Sequence[tuple[str, int]]) -> list[str]:
    return [f"{prefix}-{i}" for prefix, count in batches for i in range(count)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.redis_worker")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--redis", required=True, help="redis:// URL, or 'none'")
    parser.add_argument("--worker", default=None, help="the worker's name in Redis")
    parser.add_argument("--batch", type=_batch, required=True)
    parser.add_argument("--expect", type=_batch, action="append", default=[])
    parser.add_argument("--resume", action="store_true", help="submit with resume=True")
    parser.add_argument("--go", action="store_true", help="do not wait for 'go' on stdin")
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--time-scale", type=float, required=True)
    parser.add_argument("--max-active", type=int, default=None)
    parser.add_argument("--rps", type=float, default=None, help="max requests per second")
    parser.add_argument("--deadline", type=float, default=90.0)
    return parser


def _watch_stdin(loop: asyncio.AbstractEventLoop, go: asyncio.Event) -> None:
    """A daemon thread: ``go`` sets the event; the end of stdin ends the process (the test
    that started it is gone, or gave up on it)."""
    for line in sys.stdin:
        if line.strip() == "go":
            loop.call_soon_threadsafe(go.set)
    os._exit(3)


def _client(args: argparse.Namespace) -> ka.KlingClient:
    account = (
        None
        if args.redis == "none"
        else RedisAccount(args.redis, worker=args.worker, lease_ttl=args.lease_ttl)
    )
    return ka.KlingClient(
        api_key=args.api_key,
        base_url=args.base_url,
        poll=ka.PollPolicy().scaled(args.time_scale),
        retry=RETRY,
        settle_window=0.2,
        timeout=2.0,
        max_requests_per_second=args.rps,
        max_active_tasks=args.max_active,
        account=account,
    )


def _own(kling: ka.KlingClient, job: ka.Job) -> bool:
    """Whether this client follows the job itself (the engine's private view: a test aid)."""
    return not kling._tracker.entry(job).replica


async def _settle(job: ka.Job) -> None:
    with contextlib.suppress(ka.KlingError):
        await job.wait()


async def run(args: argparse.Namespace) -> int:
    go = asyncio.Event()
    threading.Thread(
        target=_watch_stdin, args=(asyncio.get_running_loop(), go), daemon=True
    ).start()
    own_ids = _ids([args.batch])
    expected = list(dict.fromkeys([*_ids(args.expect), *own_ids]))
    async with _client(args) as kling:
        _out("ready", worker=args.worker, pid=os.getpid())
        if not args.go:
            await go.wait()
        t_go = time.time()
        requests = [
            ka.Text2VideoRequest(prompt=f"clip {job_id}", external_task_id=job_id)
            for job_id in own_ids
        ]
        jobs = kling.submit_many(requests, resume=args.resume)
        t_own: float | None = None
        seen: set[str] = set()
        next_owns = 0.0
        with anyio.move_on_after(args.deadline):
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(_settle, job)
                while len(seen) < len(expected):
                    for job_id in expected:
                        found = kling.job(job_id)
                        if job_id not in seen and found is not None and found.done:
                            seen.add(job_id)
                            _out(
                                "job",
                                id=job_id,
                                status=found.status.value,
                                task_id=found.task_id,
                                own=_own(kling, found),
                                t=time.time(),
                            )
                    if t_own is None and all(job.done for job in jobs):
                        t_own = time.time()
                    if time.monotonic() >= next_owns:
                        next_owns = time.monotonic() + 0.1
                        following = [j for j in kling.jobs() if not j.done and _own(kling, j)]
                        _out("owns", n=len(following))
                    await anyio.sleep(0.02)
        if t_own is None and all(job.done for job in jobs):
            t_own = time.time()
        if len(seen) < len(expected):
            missing = {}
            for job_id in expected:
                found = kling.job(job_id)
                if job_id not in seen:
                    missing[job_id] = "absent" if found is None else found.status.value
            _out("timeout", missing=missing)
            return 2
        stats = kling.stats
        _out(
            "done",
            worker=args.worker,
            t_go=t_go,
            t_own=t_own,
            t_all=time.time(),
            stats={
                "submitted": stats.submitted,
                "rejected": stats.rejected,
                "concurrency_limited": stats.concurrency_limited,
                "api_requests": stats.api_requests,
                "polls": stats.polls,
                "peak_active": stats.peak_active,
            },
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {args.worker or os.getpid()} %(levelname)s %(message)s",
    )
    return anyio.run(run, args, backend="asyncio")


if __name__ == "__main__":
    sys.exit(main())
