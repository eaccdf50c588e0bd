"""The command line's grammar: ``kling-async {batch,status,emulator}`` and every option.

It imports neither rich nor the SDK's client, so ``--help``, ``--version`` and usage errors
work without the ``[cli]`` extra (as does ``kling-async emulator``, which has its own parser:
the emulator's, under the name ``kling-async emulator``).

A usage error prints the usage of the command it belongs to (``kling-async batch --bogus``
shows ``usage: kling-async batch ...``, not the top-level one), then one line naming the
option and the rule, and exits with status 2. No message echoes a value: an unrecognised
argument may be a key after a mistyped option (``--api-kye KEY``) or glued to one
(``-aKEY``), and an invalid value may be a key given to the wrong option (``--mode KEY``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, NoReturn

import kling_async as ka

from ._journal import JOURNAL_NAME
from ._secrets import scrub_argparse
from ._settings import EMULATOR_TIME_SCALE

__all__ = [
    "EXIT_USAGE",
    "build_parser",
    "parse_arguments",
    "parse_size",
]

EXIT_USAGE: Final = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # The usage of this (sub)command, then one line, and never a value.
        self.print_usage(sys.stderr)
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


def _within(low: float, high: float, rule: str) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high``, else ``rule``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(rule) from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(rule)
        return value

    return parse


_lease = _within(
    *LEASE_RANGE, f"must be a number of seconds from {LEASE_RANGE[0]:g} to {LEASE_RANGE[1]:g}"
)
_time_scale = _within(
    *TIME_SCALE_RANGE, f"must be a number from {TIME_SCALE_RANGE[0]:g} to {TIME_SCALE_RANGE[1]:g}"
)


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
    """The whole grammar (see :func:`parse_arguments`, which also checks combinations)."""
    parser = _Parser(
        prog="kling-async",
        usage="%(prog)s [--version] {batch,status,emulator} ...",
        description="Generate many Kling text-to-video clips; safe to kill and rerun.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"kling-async {ka.__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="{batch,status,emulator}", required=True, parser_class=_Parser
    )

    batch = commands.add_parser(
        "batch",
        prog="kling-async batch",
        usage="%(prog)s PROMPTS --out DIR [options]",
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
    group = batch.add_argument_group(
        "output (--json sets what stdout is, --quiet what stderr says: they combine)"
    )
    group.add_argument(
        "--progress",
        choices=("auto", "live", "plain"),
        default=None,
        help="live view, or one line per change (default: live on a terminal); not with "
        "--json or --quiet",
    )
    group.add_argument(
        "--json",
        action="store_true",
        help="stdout is JSON lines only: an object per status change of a row, then a summary "
        "object; messages go to stderr",
    )
    chatter = group.add_mutually_exclusive_group()
    chatter.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only errors and the last line (no progress, no table, no notes)",
    )
    chatter.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list every row in the final table, and log the SDK's retries and lookups",
    )

    status = commands.add_parser(
        "status",
        prog="kling-async status",
        usage="%(prog)s DIR [--journal PATH] [--json]",
        help="what the journal of a batch says, per state",
        description="Show what the journal of the batch in DIR says, per state.",
        allow_abbrev=False,
    )
    status.add_argument("out", metavar="DIR", type=Path, help="the batch's --out directory")
    status.add_argument("--journal", type=Path, metavar="PATH", help="journal file, if not in DIR")
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (counts, problems, every row) instead of the table",
    )

    commands.add_parser(
        "emulator",
        prog="kling-async emulator",
        help="serve the emulator; print its URL and key (kling-async emulator --help)",
        add_help=False,
    )
    return parser


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)  # pragma: no cover - build_parser always has them


#: What argparse takes for a negative number (a value), not an option.
_NEGATIVE: Final = re.compile(r"-\d+|-\d*\.\d+")


def _options(tokens: Sequence[str]) -> list[str]:
    """The tokens that argparse would read as options (up to a ``--``)."""
    found = []
    for word in tokens:
        if word == "--":
            break
        if word.startswith("-") and len(word) > 1 and not _NEGATIVE.fullmatch(word):
            found.append(word)
    return found


def _unknown(parser: argparse.ArgumentParser, word: str) -> bool:
    known = parser._option_string_actions
    if word.startswith("--"):
        return word.partition("=")[0] not in known
    # -v, -vq, -qv: every letter a known flag; anything else (-aKEY) is unknown.
    return not all(f"-{letter}" in known for letter in word[1:]) and word[:2] not in known


def _option_name(word: str) -> str:
    """What of an unknown option may be shown: ``--name`` without its ``=value``, ``-x``
    without what is stuck to it (``-aKEY``), never more (it may be a key)."""
    if word.startswith("--"):
        name = word.partition("=")[0]
        return name if re.fullmatch(r"--[a-z][a-z0-9-]{0,30}", name) else "--..."
    return word[:2]


def parse_arguments(arguments: Sequence[str]) -> argparse.Namespace:
    """Parse a ``batch`` or ``status`` command line; a usage error exits (status 2) with the
    usage of the subcommand it was made in, and combinations that cannot work are refused
    here too (``--progress`` with ``--json`` or ``--quiet``)."""
    parser = build_parser()
    first = arguments[0] if arguments else ""
    if first.startswith("-") and _unknown(parser, first):
        # An option before the subcommand: say so, not that the subcommand is missing.
        parser.print_usage(sys.stderr)
        parser.exit(
            EXIT_USAGE,
            f"{parser.prog}: error: unrecognized option {_option_name(first)}: a "
            "subcommand's options go after it (kling-async batch PROMPTS --out DIR ...)\n",
        )
    if arguments[:1] in (["batch"], ["status"]):
        # An unknown option first, before "PROMPTS is required" hides it.
        sub = _subcommand(parser, arguments[0])
        unknown = [token for token in _options(arguments[1:]) if _unknown(sub, token)]
        if unknown:
            sub.error("unrecognized arguments: " + " ".join(unknown))
    args, extra = parser.parse_known_args(arguments)
    command = _subcommand(parser, args.command)
    if extra:
        # argparse hands a subcommand's unknown arguments up to the top level, whose usage
        # would be the wrong one: say it in the subcommand's own words.
        command.error("unrecognized arguments: " + " ".join(extra))
    if args.command == "batch" and args.progress is not None:
        for flag, given in (("--json", args.json), ("--quiet", args.quiet)):
            if given:
                command.error(
                    f"argument --progress: not allowed with argument {flag} "
                    f"({flag} shows no progress view)"
                )
    return args
