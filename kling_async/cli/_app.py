"""``kling-async``: the command line (``batch``, ``status``, ``emulator``).

Exit statuses: 0 every row done; 1 some rows failed or did not finish (also when the run had
to stop after sending, e.g. on a full disk); 2 usage, input or journal problems found before
anything was sent; 3 an account-level error (arrears, no permission, a
rejected key) stopped the batch; 4 the API host could not be reached (refused connections,
DNS or TLS failures for ``unreachable_after`` seconds); 130 interrupted (the journal is
intact: rerun the command).

This module imports no rich: ``kling-async emulator``, ``--help``, ``--version`` and usage
errors work without the ``[cli]`` extra; ``batch`` and ``status`` say they need it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import kling_async as ka

from ._display import printable
from ._journal import JournalError, journal_path
from ._messages import quiet, say, tell
from ._parser import EXIT_USAGE, build_parser, parse_arguments
from ._secrets import RedactingStream, Redactor, secrets_in

if TYPE_CHECKING:
    from rich.console import Console

    from ._settings import BatchSettings

__all__ = ["build_parser", "main"]

NEEDS_EXTRA: Final = (
    'kling-async {command}: needs the cli extra (rich): pip install "kling-async[cli]" '
    "(kling-async emulator works without it)"
)
EXIT_SOME_FAILED: Final = 1


def _batch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ._settings import ArgumentError, settings_from

    try:
        settings = settings_from(args)
    except ArgumentError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    # With --json, stdout holds JSON lines only: what is for a person goes to stderr.
    console = Console(
        file=sys.stderr if settings.json else sys.stdout,
        force_terminal=True if settings.progress == "live" else None,
    )
    with _log_to_stderr(verbose=args.verbose), quiet(settings.quiet):
        return _run(settings, console)


def _run(settings: BatchSettings, console: Console) -> int:
    """Validate the whole file, then plan (``--dry-run``) or run."""
    import anyio

    from ._files import disk_full_message, is_disk_full
    from ._prompts import PromptFileError, load_prompts
    from ._run import interrupted_before_start, run_batch
    from ._settings import NO_KEY_HINT

    try:
        prompt_file = load_prompts(settings.prompts, settings.defaults, settings.profile)
    except PromptFileError as exc:
        say(f"error: {len(exc.problems)} problem(s) in {exc.path}; nothing was sent")
        say(exc.describe())
        return EXIT_USAGE
    for warning in prompt_file.warnings:
        tell(f"warning: {warning}")
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
    from rich.console import Console

    from ._status import show_status, status_json

    path = journal_path(args.out, args.journal)
    if args.json:
        return status_json(sys.stdout, args.out, path)
    console = Console(file=sys.stdout, highlight=False)
    return show_status(console, args.out, path)


def _has_rich() -> bool:
    try:
        import rich.console  # noqa: F401 (the [cli] extra)
    except ImportError:
        return False
    return True


def _emulator(arguments: Sequence[str]) -> int:
    # Printing its own throwaway URL and key is that command's whole point.
    from kling_async.testing import main as emulator_main

    try:
        return emulator_main(arguments, prog="kling-async emulator")
    except SystemExit as exit_:  # --help, or a usage error (its parser's usage, status 2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kling-async`` console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["emulator"]:
        return _emulator(arguments[1:])
    redact = Redactor(secrets_in(arguments, os.environ))
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(stdout, redact)
    sys.stderr = RedactingStream(stderr, redact)
    try:
        try:
            args = parse_arguments(arguments)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
        if args.command == "emulator":  # after a top-level option: kling-async -- emulator
            return _emulator([])
        if not _has_rich():
            say(NEEDS_EXTRA.format(command=args.command))
            return EXIT_USAGE
        if args.command == "status":
            return _status(args)
        return _batch(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = stdout, stderr
