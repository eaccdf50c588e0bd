"""Prompt files: ``.txt`` (one prompt a line), ``.jsonl`` and ``.csv`` (one request a row).

``.txt`` skips blank lines and lines starting with ``#``. ``.jsonl`` rows are JSON objects and
``.csv`` files have a header row; both name :class:`~kling_async.Text2VideoRequest` fields (a
CSV cell for ``camera_control`` or ``extra`` holds JSON, an empty cell leaves the field unset).
A CSV row is one physical line: a quoted cell that runs on to the next line is nearly always a
stray quote that would merge rows, so it is an error, not a multi-line prompt.

The whole file is read and every row validated, against the same backend profile the client
will use, before anything is sent: an overnight batch that dies on row 212 of 300 because of a
typo is the failure this module exists to prevent. Every problem found is reported with its
line, the field, the value and the rule, all at once rather than one per run.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

import kling_async as ka

__all__ = [
    "FORMATS",
    "Defaults",
    "PromptFile",
    "PromptFileError",
    "PromptRow",
    "Problem",
    "load_prompts",
]

FORMATS: Final = (".txt", ".jsonl", ".csv")
#: Fields a row may set: every Text2VideoRequest field (``extra`` carries the ones this SDK
#: does not know yet, e.g. ``{"sound": "on"}``).
FIELDS: Final = tuple(field.name for field in attrs.fields(ka.Text2VideoRequest))
_JSON_CELLS: Final = ("camera_control", "extra")
_NUMBER_CELLS: Final = ("cfg_scale",)
_MAX_SHOWN: Final = 30
#: JSON nested deeper than this is refused (requests are a few levels deep): deeper values
#: would only exhaust the recursion of the JSON parser, ``repr`` and the encoder.
MAX_JSON_DEPTH: Final = 64


def short_repr(value: object, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters: one huge cell must not flood the list of problems."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@attrs.frozen
class Problem:
    """One thing wrong with the file, where it is."""

    line: int
    message: str


class PromptFileError(Exception):
    """The file cannot be used as it is; ``problems`` lists everything found, in line order."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = sorted(problems, key=lambda problem: problem.line)
        super().__init__(self.describe())

    def describe(self, limit: int = _MAX_SHOWN) -> str:
        lines = [
            f"{self.path}:{problem.line}: {problem.message}" if problem.line else problem.message
            for problem in self.problems[:limit]
        ]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)


@attrs.frozen
class Defaults:
    """Values from the command line for fields a row leaves unset (a row's own value wins)."""

    model_name: str | None = None
    mode: str | None = None
    duration: str | None = None
    aspect_ratio: str | None = None

    def apply(self, fields: dict[str, Any]) -> dict[str, Any]:
        for name in ("model_name", "mode", "duration", "aspect_ratio"):
            value = getattr(self, name)
            if value is not None and fields.get(name) is None:
                fields[name] = value
        return fields


def canonical_json(request: ka.Text2VideoRequest) -> str:
    """The request's public ``to_dict()``, canonically encoded: what the request hash is of."""
    return json.dumps(request.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_from_body(body: Mapping[str, Any]) -> ka.Text2VideoRequest:
    """The request a wire body was made from (journals of schema 1 and 2 stored bodies): the
    declared fields by name, every other key in ``extra``, as the body merged them."""
    known = {key: value for key, value in body.items() if key in FIELDS and key != "extra"}
    extra = {key: value for key, value in body.items() if key not in known}
    return ka.Text2VideoRequest(**known, extra=extra)


def request_hash(request_json: str) -> str:
    """What "the same request" means on a rerun: a hash of exactly what would be sent."""
    return hashlib.sha256(request_json.encode()).hexdigest()


def row_key(own_id: str | None, hash_: str, occurrence: int) -> str:
    """A row's identity across reruns (the journal's migration computes it the same way)."""
    return f"id:{own_id}" if own_id is not None else f"{hash_}#{occurrence}"


@attrs.frozen
class PromptRow:
    """One request of the file.

    ``number`` is its position among the file's requests (1-based), ``line`` where it starts;
    both follow the file as it is now. ``key`` identifies the row across reruns by what it
    asks for, not where it is: its own ``external_task_id`` if the row names one, else the hash
    of the exact request and ``occurrence``, its count among identical requests of the file
    (the second identical prompt is a row of its own). Inserting, removing or moving lines
    leaves every other row's identity alone; editing a row makes it another row.
    """

    number: int
    line: int
    request: ka.Text2VideoRequest
    occurrence: int = 1
    request_json: str = attrs.field(
        default=attrs.Factory(lambda self: canonical_json(self.request), takes_self=True)
    )
    request_hash: str = attrs.field(
        default=attrs.Factory(lambda self: request_hash(self.request_json), takes_self=True)
    )

    @property
    def key(self) -> str:
        return row_key(self.request.external_task_id, self.request_hash, self.occurrence)


@attrs.frozen
class PromptFile:
    path: Path
    rows: tuple[PromptRow, ...]
    warnings: tuple[str, ...] = ()


def _field_problem(field: str) -> str:
    close = difflib.get_close_matches(field, FIELDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{field!r} is not a request field{hint}; the fields are {', '.join(FIELDS)}"


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(path, [Problem(0, f"{path}: no such file")]) from None
    except IsADirectoryError:
        raise PromptFileError(path, [Problem(0, f"{path}: is a directory, not a file")]) from None
    except OSError as exc:
        raise PromptFileError(path, [Problem(0, f"{path}: cannot read it ({exc})")]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(
            path,
            [Problem(line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8")],
        ) from None


def _too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _json(text: str) -> Any:
    """Parse JSON text; ValueError with a message fit for a person if it cannot be used."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:  # e.g. an integer with thousands of digits
        raise ValueError("a number has too many digits") from None
    if _too_deep(value):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _txt_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        yield line_number, {"prompt": prompt}


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = _json(line)
        except ValueError as exc:
            yield line_number, Problem(line_number, f"not valid JSON: {exc}")
            continue
        if not isinstance(value, dict):
            yield (
                line_number,
                Problem(
                    line_number,
                    f"must be a JSON object with a prompt field, got {short_repr(value, 40)}",
                ),
            )
            continue
        yield line_number, value


def _csv_cell(field: str, cell: str) -> Any:
    """A CSV cell as the value the request field takes: numbers and JSON objects parsed."""
    if field in _NUMBER_CELLS:
        try:
            return float(cell)
        except ValueError:
            raise ka.ValidationError(field, cell, "must be a number") from None
    if field in _JSON_CELLS:
        try:
            return _json(cell)
        except ValueError as exc:
            raise ka.ValidationError(field, cell, f"must be a JSON object ({exc})") from None
    return cell


def _csv_error(start: int, end: int, exc: csv.Error) -> Problem:
    if "unexpected end of data" in str(exc):
        if end > start:
            return Problem(start, f"a quoted cell runs on to line {end} (a stray quote?)")
        return Problem(start, "a quoted cell is never closed (a stray quote?)")
    hint = " (a stray quote?)" if '"' in str(exc) else ""
    return Problem(start, f"not valid CSV: {exc}{hint}")


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    # strict: text after a closing quote, or a quote never closed, is an error (not glued on).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield 1, _csv_error(1, reader.line_num, exc)
        return
    if reader.line_num > 1:
        yield 1, Problem(1, f"header: a quoted cell runs on to line {reader.line_num}")
        return
    columns = [column.strip() for column in header]
    bad = [column for column in columns if column not in FIELDS]
    if bad or "prompt" not in columns:
        problems = [_field_problem(column) for column in bad]
        if "prompt" not in columns:
            problems.append("the header has no prompt column")
        yield 1, Problem(1, "header: " + "; ".join(problems))
        return
    duplicated = sorted({column for column in columns if columns.count(column) > 1})
    if duplicated:
        yield 1, Problem(1, f"header: column {duplicated[0]!r} appears twice")
        return
    last_line = reader.line_num
    while True:
        start = last_line + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, _csv_error(start, reader.line_num, exc)
            return
        last_line = reader.line_num
        if last_line > start:
            # Two rows merged by a stray quote, or a prompt over several lines: either way
            # not what a person sees in the file, so nothing is guessed.
            yield (
                start,
                Problem(start, f"a quoted cell runs on to line {last_line} (a stray quote?)"),
            )
            continue
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(columns):
            yield (
                start,
                Problem(start, f"has {len(record)} cells; the header has {len(columns)} columns"),
            )
            continue
        fields: dict[str, Any] = {}
        try:
            for column, cell in zip(columns, record, strict=True):
                if cell.strip() or column == "prompt":
                    fields[column] = _csv_cell(column, cell)
        except ka.ValidationError as exc:
            yield start, Problem(start, str(exc))
            continue
        yield start, fields


def _build(fields: Mapping[str, Any], defaults: Defaults) -> ka.Text2VideoRequest:
    unknown = [name for name in fields if name not in FIELDS]
    if unknown:
        raise ValueError(_field_problem(str(unknown[0])))
    if "prompt" not in fields:
        raise ka.ValidationError("prompt", None, "is required")
    return ka.Text2VideoRequest(**defaults.apply(dict(fields)))


def load_prompts(path: Path, defaults: Defaults, profile: ka.BackendProfile) -> PromptFile:
    """Read and validate the whole file; raise :class:`PromptFileError` listing every problem.

    Rows are checked as the client will check them (model rules, then ``profile``'s limits),
    and ``external_task_id`` values must be unique within the file. Warnings (an unknown model
    name: sent anyway) are collected once each, not raised.
    """
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PromptFileError(
            path,
            [
                Problem(
                    0,
                    f"{path}: unsupported file type {suffix or '(none)'!r}; "
                    f"use {', '.join(FORMATS)}",
                )
            ],
        )
    text = _read_text(path)
    parse = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[suffix]
    problems: list[Problem] = []
    rows: list[PromptRow] = []
    seen_ids: dict[str, int] = {}
    occurrences: dict[str, int] = {}
    notes: dict[str, None] = {}
    number = 0
    for line, parsed in parse(text):
        if isinstance(parsed, Problem):
            problems.append(parsed)
            number += 1
            continue
        number += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                request = _build(parsed, defaults)
                profile.validate(request)
                encoded = canonical_json(request)
                digest = request_hash(encoded)
            except UnicodeEncodeError:
                problems.append(Problem(line, "holds a lone surrogate (\\ud800-\\udfff), not text"))
                continue
            except Exception as exc:  # every bad row is a problem, never a crash
                problems.append(Problem(line, str(exc) or type(exc).__name__))
                continue
        for warning in caught:
            notes[str(warning.message)] = None
        own_id = request.external_task_id
        occurrence = 1
        if own_id is not None:
            if own_id in seen_ids:
                problems.append(
                    Problem(
                        line,
                        f"external_task_id={own_id!r} is invalid: already used on line "
                        f"{seen_ids[own_id]}; each row needs its own",
                    )
                )
                continue
            seen_ids[own_id] = line
        else:
            occurrence = occurrences[digest] = occurrences.get(digest, 0) + 1
        rows.append(
            PromptRow(
                number=number,
                line=line,
                request=request,
                occurrence=occurrence,
                request_json=encoded,
                request_hash=digest,
            )
        )
    if not problems and not rows:
        problems.append(Problem(0, f"{path}: no prompts found (blank lines and # comments only)"))
    if problems:
        raise PromptFileError(path, problems)
    return PromptFile(path=path, rows=tuple(rows), warnings=tuple(notes))
