"""``kling-async``: the command line (``batch``, ``status``, ``emulator``).

Exit statuses: 0 every row done; 1 some rows failed or did not finish; 2 usage, input or
journal problems (nothing was sent); 3 an account-level error (arrears, no permission, a
rejected key) stopped the batch; 130 interrupted (the journal is intact: rerun the command).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import anyio
from rich.console import Console

from .._auth import ENV_API_KEY, ENV_BASE_URL
from .._client import COMETAPI_BASE_URL
from .._download import DEFAULT_MAX_BYTES
from .._errors import KlingError
from .._models import Mode
from .._version import __version__
from ._journal import JOURNAL_NAME, JournalError, journal_path
from ._prompts import PromptFileError, load_prompts
from ._run import EXIT_SOME_FAILED, EXIT_USAGE, interrupted_before_start, run_batch, say
from ._secrets import RedactingStream, Redactor, scrub_unrecognized, secrets_in
from ._settings import EMULATOR_TIME_SCALE, NO_KEY_HINT, BatchSettings, UsageError, settings_from

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # An unrecognised argument may be a key after a mistyped option: never echo values.
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {scrub_unrecognized(message)}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0")
    return value


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1048576``, ``1.5GiB``: bytes, binary units."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = cleaned[-1:] if cleaned[-1:] in ("K", "M", "G", "T") else ""
    try:
        value = float(cleaned[: len(cleaned) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M or 2G") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kling-async",
        description="Generate many Kling text-to-video clips; safe to kill and rerun.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"kling-async {__version__}")
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
    group.add_argument("--mode", choices=[mode.value for mode in Mode])
    group.add_argument("--duration", metavar="SECONDS", help="clip length, e.g. 5 or 10")
    group.add_argument("--aspect-ratio", metavar="RATIO", help="e.g. 16:9, 9:16, 1:1")
    group = batch.add_argument_group("backend")
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"CometAPI key (default: ${ENV_API_KEY}; prefer the variable, since command "
        "lines are visible to other users)",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        help=f"API base URL (default: ${ENV_BASE_URL}, else {COMETAPI_BASE_URL} for keys "
        "and Kling's own API for access keys)",
    )
    group.add_argument(
        "--emulator",
        action="store_true",
        help="start the built-in emulator and use it: no account, no cost, placeholder clips",
    )
    group.add_argument(
        "--time-scale",
        type=_positive_float,
        metavar="FACTOR",
        help="real seconds per emulated second, to poll a time-scaled emulator as fast "
        f"(default: {EMULATOR_TIME_SCALE} with --emulator, else 1)",
    )
    group = batch.add_argument_group("limits and files")
    group.add_argument(
        "--max-active", type=_positive_int, metavar="N", help="tasks at once (default: learned)"
    )
    group.add_argument(
        "--max-downloads",
        type=_positive_int,
        default=4,
        metavar="N",
        help="downloads at once (default: 4)",
    )
    group.add_argument(
        "--max-file-size",
        type=parse_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help="refuse larger result files, e.g. 500M (default: 2G)",
    )
    group.add_argument(
        "--allow-host",
        action="append",
        metavar="HOST",
        help="download only from this host; repeatable; .example.com allows its subdomains",
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
    except UsageError as exc:
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
    if settings.credentials is None and not settings.emulator:
        say(f"error: {NO_KEY_HINT}")
        return EXIT_USAGE
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        say(f"error: cannot create {settings.out}: {exc}")
        return EXIT_USAGE
    try:
        return anyio.run(run_batch, settings, prompt_file, console, backend="asyncio")
    except KeyboardInterrupt:
        return interrupted_before_start(settings)
    except Exception as exc:
        cause = _first_known(exc)
        if cause is None:
            raise
        say(f"error: {cause}")
        return EXIT_USAGE if isinstance(cause, JournalError) else EXIT_SOME_FAILED


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (the live view redirects it above its
    region; the redaction wraps it), not to the stream there was when logging was set up."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


@contextmanager
def _log_to_stderr(*, verbose: bool) -> Iterator[None]:
    """The SDK's own log lines only with ``-v``: without it, the command reports the same
    facts itself (retries and lookups are not news; account errors are said once, by us).
    The logger is put back as it was afterwards (``main`` may run inside a larger program)."""
    logger = logging.getLogger("kling_async")
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
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
    if isinstance(exc, KlingError | JournalError | OSError):
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
        from ..testing._cli import main as emulator_main

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
