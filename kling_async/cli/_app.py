"""``kling-async``: the command line (``batch``, ``status``, ``emulator``).

Exit statuses: 0 every row done; 1 some rows failed or did not finish (also when the run had
to stop after sending, e.g. on a full disk); 2 usage, input or journal problems found before
anything was sent; 3 an account-level error (arrears, no permission, a
rejected key) stopped the batch; 4 the API host could not be reached (refused connections,
DNS or TLS failures for ``unreachable_after`` seconds); 130 interrupted (the journal is
intact: rerun the command).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, NoReturn

import anyio
from rich.console import Console

import kling_async as ka

from ._display import printable
from ._files import disk_full_message, is_disk_full
from ._journal import JOURNAL_NAME, JournalError, journal_path
from ._prompts import PromptFileError, load_prompts
from ._run import EXIT_SOME_FAILED, EXIT_USAGE, interrupted_before_start, run_batch, say
from ._secrets import RedactingStream, Redactor, scrub_argparse, secrets_in
from ._settings import EMULATOR_TIME_SCALE, NO_KEY_HINT, ArgumentError, BatchSettings, settings_from

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, and never a value: an argument may be a key after a mistyped option, glued
        # to one (-aKEY), or given to the wrong one (--mode KEY).
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {scrub_argparse(message)} (see {self.prog} --help)\n",
        )


#: Bounds of the numeric options: beyond them a value is a typo, not a setting.
MAX_ACTIVE: Final = 10_000
MAX_DOWNLOADS: Final = 1_000
TIME_SCALE_RANGE: Final = (1e-6, 100.0)
_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MAX_FILE_SIZE: Final = _UNITS["T"]
MAX_DOWNLOAD_TIMEOUT: Final = 86_400.0
LEASE_RANGE: Final = (0.5, 3600.0)


def _whole_number(high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        # Our messages never quote the value (it may be a key given to the wrong option).
        rule = f"must be a whole number from 1 to {high}"
        try:
            value = int(text)
        except ValueError:  # also for thousands of digits
            raise argparse.ArgumentTypeError(rule) from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(rule)
        return value

    return parse


def _seconds(high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        rule = f"must be a number of seconds above 0, at most {high:g}"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(rule) from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(rule)
        return value

    return parse


def _lease(text: str) -> float:
    low, high = LEASE_RANGE
    rule = f"must be a number of seconds from {low:g} to {high:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(rule) from None
    if not (math.isfinite(value) and low <= value <= high):
        raise argparse.ArgumentTypeError(rule)
    return value


def _time_scale(text: str) -> float:
    low, high = TIME_SCALE_RANGE
    rule = f"must be a number from {low:g} to {high:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(rule) from None
    if not (math.isfinite(value) and low <= value <= high):
        raise argparse.ArgumentTypeError(rule)
    return value


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1048576``, ``1.5GiB``: bytes, binary units, 1 byte to 1T."""
    rule = "must be a size from 1 byte to 1T, like 500M or 2G"
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = cleaned[-1:] if cleaned[-1:] in ("K", "M", "G", "T") else ""
    try:
        value = float(cleaned[: len(cleaned) - len(unit)]) * _UNITS[unit]
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(rule) from None
    if not (math.isfinite(value) and 1 <= value <= MAX_FILE_SIZE):
        raise argparse.ArgumentTypeError(rule)
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kling-async",
        description="Generate many Kling text-to-video clips; safe to kill and rerun.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"kling-async {ka.__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="{batch,status,emulator}", required=True, parser_class=_Parser
    )

    batch = commands.add_parser(
        "batch",
        help="generate a clip for every row of a prompt file",
        description="Generate a clip for every row of PROMPTS into DIR. Safe to kill and "
        "rerun: a journal in DIR records every task, so rerunning the same command resumes "
        "without submitting anything twice.",
        allow_abbrev=False,
    )
    batch.add_argument(
        "prompts", metavar="PROMPTS", type=Path, help=".txt (one prompt a line), .jsonl or .csv"
    )
    batch.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="clips, journal and summary.json"
    )
    group = batch.add_argument_group("request defaults (a row's own value wins)")
    group.add_argument("--model", metavar="NAME", help="model_name, e.g. kling-v2-6")
    group.add_argument("--mode", choices=[mode.value for mode in ka.Mode])
    group.add_argument("--duration", metavar="SECONDS", help="clip length, e.g. 5 or 10")
    group.add_argument("--aspect-ratio", metavar="RATIO", help="e.g. 16:9, 9:16, 1:1")
    group = batch.add_argument_group("backend")
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="CometAPI key (default: $KLING_API_KEY; prefer the variable, since command "
        "lines are visible to other users)",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        help=f"API base URL (default: $KLING_BASE_URL, else {ka.COMETAPI_BASE_URL} for keys "
        "and Kling's own API for access keys)",
    )
    group.add_argument(
        "--unreachable-after",
        type=_seconds(MAX_DOWNLOAD_TIMEOUT),
        default=30.0,
        metavar="SECONDS",
        help="stop (exit 4) once the API host has refused every connection for this long "
        "(default: 30)",
    )
    group.add_argument(
        "--emulator",
        action="store_true",
        help="start the built-in emulator and use it: no account, no cost, placeholder clips",
    )
    group.add_argument(
        "--time-scale",
        type=_time_scale,
        metavar="FACTOR",
        help="real seconds per emulated second, to poll a time-scaled emulator as fast "
        f"(default: {EMULATOR_TIME_SCALE} with --emulator, else 1; "
        f"{TIME_SCALE_RANGE[0]:g} to {TIME_SCALE_RANGE[1]:g})",
    )
    group = batch.add_argument_group("limits and files")
    group.add_argument(
        "--max-active",
        type=_whole_number(MAX_ACTIVE),
        metavar="N",
        help=f"tasks at once, 1 to {MAX_ACTIVE} (default: learned)",
    )
    group.add_argument(
        "--max-downloads",
        type=_whole_number(MAX_DOWNLOADS),
        default=4,
        metavar="N",
        help=f"downloads at once, 1 to {MAX_DOWNLOADS} (default: 4)",
    )
    group.add_argument(
        "--max-file-size",
        type=parse_size,
        default=ka.DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help="refuse larger result files, e.g. 500M, at most 1T (default: 2G)",
    )
    group.add_argument(
        "--allow-host",
        action="append",
        metavar="HOST",
        help="also download from this host whatever its addresses (by default only the API's "
        "host and hosts with public addresses); repeatable; .example.com covers subdomains",
    )
    group.add_argument(
        "--allow-private-downloads",
        action="store_true",
        help="let result URLs point at private, loopback or link-local addresses",
    )
    group.add_argument(
        "--download-timeout",
        type=_seconds(MAX_DOWNLOAD_TIMEOUT),
        default=ka.DEFAULT_DOWNLOAD_TIMEOUT,
        metavar="SECONDS",
        help="give up on a file that has not arrived in this time, retries included "
        f"(default: {ka.DEFAULT_DOWNLOAD_TIMEOUT:g})",
    )
    group = batch.add_argument_group("several machines (one batch, split between them)")
    group.add_argument(
        "--redis",
        metavar="URL",
        help="share this batch with every machine running it with the same prompt file and "
        "this Redis: rows are claimed as slots free, each done once (default: "
        "$KLING_REDIS_URL, better for a URL with a password, since command lines are visible "
        "to other users; an empty value: this machine alone)",
    )
    group.add_argument(
        "--redis-lease",
        type=_lease,
        metavar="SECONDS",
        help="a machine silent for half of this is taken for dead and its rows taken over "
        f"(default: 30; {LEASE_RANGE[0]:g} to {LEASE_RANGE[1]:g})",
    )
    group = batch.add_argument_group("run")
    group.add_argument(
        "--journal", type=Path, metavar="PATH", help=f"journal file (default: DIR/{JOURNAL_NAME})"
    )
    group.add_argument(
        "--retry-failed",
        action="store_true",
        help="submit failed and rejected rows again (a new task each, billed again)",
    )
    group.add_argument(
        "--forget-durations",
        action="store_true",
        help="forget the task durations earlier runs learned (kept in the journal, or in "
        "Redis with --redis) and learn afresh: for when tasks got faster or slower for good",
    )
    group.add_argument(
        "--dry-run", action="store_true", help="validate every row, print the plan, send nothing"
    )
    group.add_argument(
        "--progress",
        choices=("auto", "live", "plain"),
        default="auto",
        help="live view, or one line per change (default: live on a terminal)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="log the SDK's retries")

    status = commands.add_parser(
        "status",
        help="what the journal of a batch says, per state",
        description="Show what the journal of the batch in DIR says, per state.",
        allow_abbrev=False,
    )
    status.add_argument("out", metavar="DIR", type=Path, help="the batch's --out directory")
    status.add_argument("--journal", type=Path, metavar="PATH", help="journal file, if not in DIR")

    commands.add_parser(
        "emulator",
        help="serve the emulator; print its URL and key (kling-async emulator --help)",
        add_help=False,
    )
    return parser


def _batch(args: argparse.Namespace) -> int:
    console = Console(file=sys.stdout, force_terminal=True if args.progress == "live" else None)
    try:
        settings = settings_from(args)
    except ArgumentError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    with _log_to_stderr(verbose=args.verbose):
        return _run(settings, console)


def _run(settings: BatchSettings, console: Console) -> int:
    """Validate the whole file, then plan (``--dry-run``) or run."""
    try:
        prompt_file = load_prompts(settings.prompts, settings.defaults, settings.profile)
    except PromptFileError as exc:
        say(f"error: {len(exc.problems)} problem(s) in {exc.path}; nothing was sent")
        say(exc.describe())
        return EXIT_USAGE
    for warning in prompt_file.warnings:
        say(f"warning: {warning}")
    if settings.dry_run:
        from ._plan import show_plan

        return show_plan(settings, prompt_file, console)
    if not settings.has_key and not settings.emulator:
        say(f"error: {NO_KEY_HINT}")
        return EXIT_USAGE
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = disk_full_message(settings.out.parent) if is_disk_full(exc) else str(exc)
        say(f"error: cannot create {settings.out}: {reason}")
        return EXIT_USAGE
    try:
        return anyio.run(run_batch, settings, prompt_file, console, backend="asyncio")
    except KeyboardInterrupt:
        return interrupted_before_start(settings)
    except Exception as exc:
        cause = _first_known(exc)
        if cause is None:
            raise
        if is_disk_full(cause) and not isinstance(cause, JournalError):
            say(f"error: {disk_full_message(settings.out)} ({cause})")
        else:
            say(f"error: {cause}")
        # Problems found before sending return 2 from run_batch itself; what ends a run
        # here (a journal that cannot be written any more, say) may follow created tasks.
        return EXIT_SOME_FAILED


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (the live view redirects it above its
    region; the redaction wraps it), not to the stream there was when logging was set up."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


class _PrintableFormatter(logging.Formatter):
    """Log lines may quote a server's words: escaped like everything else we print."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


@contextmanager
def _log_to_stderr(*, verbose: bool) -> Iterator[None]:
    """The SDK's own log lines only with ``-v``: without it, the command reports the same
    facts itself (retries and lookups are not news; account errors are said once, by us).
    The logger is put back as it was afterwards (``main`` may run inside a larger program)."""
    logger = logging.getLogger("kling_async")
    handler = _CurrentStderr()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.CRITICAL)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _first_known(exc: BaseException) -> BaseException | None:
    """The error a person can act on, out of a task group's exception group."""
    if isinstance(exc, ka.KlingError | JournalError | OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_known(inner)
            if found is not None:
                return found
    return None


def _status(args: argparse.Namespace) -> int:
    from ._status import show_status

    console = Console(file=sys.stdout, highlight=False)
    return show_status(console, args.out, journal_path(args.out, args.journal))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kling-async`` console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["emulator"]:
        # Printing its own throwaway URL and key is that command's whole point.
        from kling_async.testing import main as emulator_main

        return emulator_main(arguments[1:], prog="kling-async emulator")
    redact = Redactor(secrets_in(arguments, os.environ))
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(stdout, redact)
    sys.stderr = RedactingStream(stderr, redact)
    try:
        try:
            args = build_parser().parse_args(arguments)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
        if args.command == "status":
            return _status(args)
        return _batch(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = stdout, stderr
