"""``python -m kling_async.testing``: run the emulator as a local server until interrupted.

It prints ``key=value`` lines on stdout (``url`` first, then the credentials, then
``files_url``, the file origin) and flushes, so a script or a test can start it, read the URL,
and point a client at it; SIGINT or SIGTERM stop it cleanly with exit status 0. With
``--state PATH`` every create is synced to PATH before it is answered, so even ``kill -9`` loses
no task a client was told about, and the next run on PATH carries on with them. :func:`main`
is reusable by a larger command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from ._emulator import DEFAULT_API_KEY, Emulator
from ._faults import Faults
from ._persist import StateFileError


def _port(text: str) -> int:
    rule = f"{text[:20]!r} must be a whole number from 0 (any free port) to 65535"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(rule) from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(rule)
    return value


def build_parser(prog: str = "python -m kling_async.testing") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a local Kling text-to-video API emulator (loopback only).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="loopback address to bind (default: 127.0.0.1)")
    add("--port", type=_port, default=0, help="port (default: 0, any free port)")
    add("--time-scale", type=float, default=1.0, help="real seconds per emulated second")
    add(
        "--seed",
        type=int,
        default=None,
        help="seed for durations, outcomes and faults (default: 0, or the --state file's)",
    )
    add("--median-duration", type=float, default=90.0, help="emulated seconds, std 5 s clip")
    add("--failure-rate", type=float, default=0.0, help="fraction of tasks that fail")
    add("--concurrency-limit", type=int, default=None, help="parallel tasks (default: none)")
    add("--rate-limit", type=float, default=None, help="requests per second (default: none)")
    add("--rate-burst", type=int, default=10, help="token bucket size for --rate-limit")
    add("--fault-rate", type=float, default=0.0, help="rate of each fault kind (Faults.storm)")
    add("--stall-seconds", type=float, default=30.0, help="how long a stalled reply waits")
    add("--url-ttl", type=float, default=None, help="emulated seconds a video URL stays valid")
    add(
        "--download-rate",
        type=float,
        default=None,
        help="bytes per real second files are served at (default: at once)",
    )
    add(
        "--duplicate-external-id",
        choices=("reject", "return_first", "allow"),
        default="reject",
        help="what a repeated external_task_id gets",
    )
    add(
        "--visibility-lag",
        type=float,
        default=0.0,
        help="emulated seconds a new task stays invisible to external-id lookups and the list",
    )
    add(
        "--strict-auth",
        action="store_true",
        help="bearer keys only on /kling/..., JWTs only on /v1/... (as the real services)",
    )
    add(
        "--no-cometapi-lookups",
        dest="cometapi_lookups",
        action="store_false",
        help="on /kling/... serve neither the list nor lookups by external_task_id",
    )
    add(
        "--files-tls",
        action="store_true",
        help="serve result files over https with the shipped self-signed certificate",
    )
    add("--files-port", type=_port, default=0, help="file origin port (default: 0, any free port)")
    add(
        "--state",
        metavar="PATH",
        default=None,
        help="keep tasks in this SQLite file (synced before each create is answered) and load "
        "them at start",
    )
    add(
        "--unknown-task",
        choices=("kling_1201", "kling_1203", "new_api"),
        default="kling_1201",
        help="how an unknown task id is answered",
    )
    add("--callbacks", choices=("every", "terminal", "chaotic"), default="every")
    add(
        "--api-key",
        action="append",
        default=None,
        help=f"accepted bearer key, repeatable (default: {DEFAULT_API_KEY})",
    )
    add(
        "--admin",
        action="store_true",
        help="also serve /_emulator/stats, /tasks, /faults and /settings (ground truth and "
        "knobs over HTTP, for tests driving the emulator from another process)",
    )
    add("--log-level", default="WARNING", help="logging level for stderr (default: WARNING)")
    return parser


def emulator_from_args(args: argparse.Namespace) -> Emulator:
    faults = None
    if args.fault_rate > 0:
        faults = Faults.storm(args.fault_rate, stall_seconds=args.stall_seconds)
    return Emulator(
        host=args.host,
        port=args.port,
        time_scale=args.time_scale,
        seed=args.seed,
        median_duration=args.median_duration,
        failure_rate=args.failure_rate,
        concurrency_limit=args.concurrency_limit,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        faults=faults,
        url_ttl=args.url_ttl,
        download_rate=args.download_rate,
        admin=args.admin,
        duplicate_external_id=args.duplicate_external_id,
        visibility_lag=args.visibility_lag,
        strict_auth=args.strict_auth,
        cometapi_lookups=args.cometapi_lookups,
        files_tls=args.files_tls,
        files_port=args.files_port,
        state_path=args.state,
        unknown_task=args.unknown_task,
        callbacks=args.callbacks,
        api_keys=tuple(args.api_key or (DEFAULT_API_KEY,)),
    )


async def serve(emulator: Emulator, out: TextIO) -> None:
    """Run until SIGINT or SIGTERM, announcing the URL and credentials on ``out``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        async with emulator:
            out.write(
                f"url={emulator.url}\n"
                f"api_key={emulator.api_key}\n"
                f"access_key={emulator.access_key}\n"
                f"secret_key={emulator.secret_key}\n"
                f"files_url={emulator.files_url}\n"
            )
            out.flush()
            await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), serve until interrupted, return 0.

    ``prog`` names the command in help and errors (``kling-async emulator`` reuses this).
    """
    parser = build_parser() if prog is None else build_parser(prog)
    args = parser.parse_args(argv)
    try:
        emulator = emulator_from_args(args)
    except (TypeError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # where signal handlers are unavailable
            asyncio.run(serve(emulator, sys.stdout))
    except StateFileError as exc:  # e.g. another emulator holds the file
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # the address is in use, or not one of this machine's
        where = f"{args.host}:{args.port} (files: port {args.files_port})"
        sys.stderr.write(f"error: cannot listen on {where}: {exc.strerror or exc}\n")
        return 2
    return 0
