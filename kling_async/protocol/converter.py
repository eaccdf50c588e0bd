"""The wire format, confined to one place: request bodies out, envelopes and tasks in.

One configured :class:`cattrs.Converter` owns every rename and quirk of Kling's JSON, as hooks
compiled once at import (``make_dict_structure_fn`` with ``override(rename=...)``) plus small
structure hooks per field: ``task_status`` spelled ``succeed`` and read tolerantly, ``duration``
a string both ways, Unix milliseconds, the nested ``task_info`` / ``task_result``, two error
envelopes, and bodies that are not JSON at all. Anything the server sends becomes a model or a
typed :class:`KlingError`, never a ``KeyError``. Plain functions over plain values (no IO), so
every quirk is testable without a server.

The same converter compiles the *record* form of the models (``to_dict`` / ``from_dict``):
attribute names instead of wire names, enums as their values, datetimes as ISO 8601 strings,
for job stores and web apps. A class has one registered hook per direction, and the wire owns
those; the record functions are compiled from the same converter and kept beside them.

Decoding runs for every poll of every task, so it is tuned: the converter does no detailed
validation (each hook says in its own words what was wrong, which is what
:class:`ResponseDecodeError` reports), hooks are looked up once, and absent keys are handled by
the compiled code rather than by a dict copy. ``benchmarks/decode.py`` keeps it honest against
the hand-written decoder it replaced.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from kling_async._errors import (
    APIError,
    ResponseDecodeError,
    ValidationError,
    api_error_class,
    no_redaction,
    snippet,
)
from kling_async.protocol.models import (
    CameraConfig,
    CameraControl,
    Task,
    TaskStatus,
    Text2VideoRequest,
    Video,
    WireInstant,
)

__all__ = [
    "answer_fingerprint",
    "converter",
    "decode_envelope",
    "request_body",
    "request_from_dict",
    "request_to_dict",
    "structure_task",
    "task_from_wire",
    "structure_task_list",
    "task_from_dict",
    "task_to_dict",
    "video_to_dict",
]

#: Detailed validation would wrap every failure in an exception group; the hooks below raise
#: errors that already say what was wrong, and skipping the bookkeeping halves decode time.
converter = cattrs.Converter(detailed_validation=False)

Redact = Callable[[str], str]


# --- wire: task and video structure hooks ---------------------------------------------------


def _ms_to_datetime(value: Any, _type: object = None) -> datetime | None:
    """Unix milliseconds (int, float or digit string) to an aware UTC datetime; else None.

    A malformed timestamp is not worth losing the task over, so it reads as unknown.
    """
    kind = type(value)
    if kind is not int and kind is not float:  # the usual int goes straight through
        if isinstance(value, bool):
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None
        if not isinstance(value, (int, float)):
            return None
    try:  # an int too large for a float (outside input) overflows here too
        if not math.isfinite(value):
            return None
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


#: Instants decoded lately, by value, so that equal ones share one float: a task created and
#: not yet changed, the tasks of one burst. Emptied when full: it only has to span a page.
_INSTANTS: dict[float, WireInstant] = {}
_INSTANTS_KEPT = 1024
#: Unix milliseconds from 0 up to here (9999-12-31T23:59:59Z) surely make a datetime.
_SURELY_VALID_MS = 253_402_300_799_000


def _wire_instant(value: Any, _type: object = None) -> WireInstant | None:
    """``created_at`` / ``updated_at``: what :func:`_ms_to_datetime` accepts, kept as the
    number (the task makes the datetime when it is read: see ``Task``), else None."""
    kind = type(value)
    if (kind is int or kind is float) and 0 <= value < _SURELY_VALID_MS:
        instant = _INSTANTS.get(value)
        if instant is not None:
            return instant
    elif _ms_to_datetime(value) is None:  # any other form, judged as it always was
        return None
    millis = float(value)  # exact: a valid instant's milliseconds are far below 2**53
    instant = _INSTANTS.get(millis)
    if instant is None:
        if len(_INSTANTS) >= _INSTANTS_KEPT:
            _INSTANTS.clear()
        instant = _INSTANTS[millis] = WireInstant(millis)
    return instant


def _structure_duration(value: Any, _type: object = None) -> float | None:
    """``"5.1"`` (Kling sends a string) or a number -> float; anything else reads as unknown."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text_or_empty(value: Any, _type: object = None) -> str:
    return value if isinstance(value, str) else ""


def _text_or_none(value: Any, _type: object = None) -> str | None:
    return value if isinstance(value, str) else None


def _any_to_str(value: Any, _type: object = None) -> str:
    return str(value)


def _wire_task_id(value: Any, _type: object = None) -> str:
    """Ids are opaque strings; a numeric id (older bodies, some gateways) is taken as one.

    Which values are ids at all is checked first, by :func:`_structure_task`.
    """
    return value if type(value) is str else str(value)


def _is_task_id(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, int) and not isinstance(value, bool)


_STATUS_BY_VALUE = {status.value: status for status in TaskStatus}


def _wire_status(value: Any, _type: object = None) -> TaskStatus:
    """Tolerant: a status Kling adds later is UNKNOWN (not finished), never a crash."""
    if type(value) is str:
        return _STATUS_BY_VALUE.get(value, TaskStatus.UNKNOWN)
    return TaskStatus.parse(value) if isinstance(value, str) else TaskStatus.UNKNOWN


#: Each known status spelled once: ``raw_status`` of a known status is this string, not the
#: copy a parse made, so 100,000 tracked tasks share a handful of strings instead of holding
#: one each.
_RAW_STATUS = {status.value: status.value for status in TaskStatus}


def _wire_raw_status(value: Any, _type: object = None) -> str:
    """``task_status`` as sent (kept for a status this SDK does not know), interned."""
    if type(value) is str:
        return _RAW_STATUS.get(value, value)
    return value if isinstance(value, str) else ""


def _wire_external_id(info: Any, _type: object = None) -> str | None:
    """``task_info.external_task_id``; ``task_info`` may be ``{}``, absent or junk."""
    if isinstance(info, Mapping):
        external = info.get("external_task_id")
        if isinstance(external, str) and external:
            return external
    return None


def _wire_deduction(value: Any, _type: object = None) -> str | None:
    return None if value is None else str(value)


def _wire_url(value: Any, _type: object = None) -> str:
    if isinstance(value, str):
        return value
    raise TypeError("a video needs a string url")


_video_from_wire = make_dict_structure_fn(
    Video,
    converter,
    _cattrs_forbid_extra_keys=False,
    id=override(struct_hook=_any_to_str),
    url=override(struct_hook=_wire_url),
    duration=override(struct_hook=_structure_duration),
    watermark_url=override(struct_hook=_text_or_none),
)


def _structure_video(value: Any, _type: object = None) -> Video:
    """One entry of ``task_result.videos``; an absent ``id`` reads as ``""``."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError("a video must be a JSON object")
    if "url" not in value:
        raise TypeError("a video needs a string url")
    if "id" not in value:
        value = {**value, "id": ""}
    return _video_from_wire(value)


def _wire_videos(result: Any, _type: object = None) -> tuple[Video, ...]:
    """``task_result.videos``; ``task_result`` is ``{}`` until success (or absent, or junk)."""
    if isinstance(result, Mapping):
        videos = result.get("videos")
        if isinstance(videos, list):
            return tuple([_structure_video(video) for video in videos])
    return ()


_task_from_wire = make_dict_structure_fn(
    Task,
    converter,
    _cattrs_forbid_extra_keys=False,  # new fields (final_unit_deduction once was) pass by
    task_id=override(struct_hook=_wire_task_id),
    status=override(rename="task_status", struct_hook=_wire_status),
    raw_status=override(rename="task_status", struct_hook=_wire_raw_status),
    status_message=override(rename="task_status_msg", struct_hook=_text_or_empty),
    external_task_id=override(rename="task_info", struct_hook=_wire_external_id),
    videos=override(rename="task_result", struct_hook=_wire_videos),
    created_at=override(struct_hook=_wire_instant),
    updated_at=override(struct_hook=_wire_instant),
    final_unit_deduction=override(struct_hook=_wire_deduction),
)


def _structure_task(value: Any, _type: object = None) -> Task:
    """A task object (the ``data`` of an answer, or a callback body) -> :class:`Task`.

    ``task_status`` is required by the model but not by the wire (old bodies omit it): absent,
    it reads as UNKNOWN, like any value this SDK does not know.
    """
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError("a task must be a JSON object")
    if not _is_task_id(value.get("task_id")):
        raise TypeError("a task needs a task_id")
    if "task_status" not in value:
        value = {**value, "task_status": ""}
    return _task_from_wire(value)


converter.register_structure_hook(Video, _structure_video)
converter.register_structure_hook(Task, _structure_task)


def _shown(data: Any, redact: Redact) -> str:
    try:
        text = json.dumps(data, default=str)
    except (ValueError, RecursionError):
        text = "<unprintable>"
    return snippet(redact(text))


def structure_task(data: Any, *, http_status: int = 200, redact: Redact = no_redaction) -> Task:
    """``data`` of a create or query answer -> :class:`Task`, or :class:`ResponseDecodeError`.

    ``redact`` cleans the snippet of the answer the error quotes (it came from the server),
    and the task's failure reason, which ends up in :class:`TaskFailedError` and journals.
    """
    try:
        task = _structure_task(data)
    except (TypeError, ValueError, KeyError, cattrs.BaseValidationError) as exc:
        reason = redact(str(exc))
    else:
        if task.status_message and redact is not no_redaction:
            cleaned = redact(task.status_message)
            if cleaned != task.status_message:
                task = attrs.evolve(task, status_message=cleaned)
        return task
    # Raised outside the handler: the structuring error is not worth a chain.
    raise ResponseDecodeError(
        f"the answer's data is not a task: {reason}",
        http_status=http_status,
        body=_shown(data, redact),
    )


def task_from_wire(body: bytes | str | Mapping[str, Any]) -> Task:
    """A bare task object as Kling sends it (a callback's body: protocol section 5) ->
    :class:`Task`, or :class:`ResponseDecodeError` saying what is wrong. The body came from
    outside: nothing in it is trusted beyond being a snapshot to confirm."""
    data: Any = body
    if isinstance(body, bytes | str):
        problem: str | None = None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            problem = f"it is not JSON ({type(exc).__name__})"
        if problem is not None:
            raise ResponseDecodeError(
                f"the body is not a task: {problem}", http_status=200, body=snippet(body)
            )
    return structure_task(data)


_REQUEST_ID = b'"request_id"'
_JSON_SPACE = b" \t\r\n"


def answer_fingerprint(body: bytes) -> int | None:
    """A fingerprint of an answer's body that leaves out its ``request_id``, or None.

    Two answers with the same fingerprint describe the same thing: every byte but the value
    of a ``"request_id"`` key (new on every answer, read by nothing that decodes a task) is
    hashed, so an unchanged task answers with an unchanged fingerprint, and the poller pool
    can reuse the :class:`Task` it decoded last time instead of parsing and structuring the
    same JSON again. A JSON key cannot occur inside a string (its quotes would be escaped),
    so what is left out is always a key's value. The hash is Python's keyed ``hash`` of
    bytes (SipHash, 64 bits): kept on each followed task, it costs a small int where the body
    would cost hundreds of bytes. None when the request id is a string with escapes in it
    (never the case in practice): such an answer is decoded, as every answer used to be.
    """
    start = body.find(_REQUEST_ID)
    if start < 0:
        return hash(body)
    at = start + len(_REQUEST_ID)
    size = len(body)
    while at < size and body[at] in _JSON_SPACE:
        at += 1
    if at >= size or body[at] != 58:  # ":" (anything else: the whole body is hashed)
        return hash(body)
    at += 1
    while at < size and body[at] in _JSON_SPACE:
        at += 1
    if at >= size or body[at] != 34:  # not a string: null, a number... (hashed whole)
        return hash(body)
    end = body.find(b'"', at + 1)
    if end < 0 or body.find(b"\\", at + 1, end) >= 0:
        return None
    return hash(body[:at] + body[end:])


def structure_task_list(
    data: Any, *, http_status: int = 200, redact: Redact = no_redaction
) -> list[Task]:
    """``data`` of a list answer (a JSON array) -> tasks."""
    if not isinstance(data, list):
        raise ResponseDecodeError(
            "the list answer's data is not an array",
            http_status=http_status,
            body=_shown(data, redact),
        )
    return [structure_task(item, http_status=http_status, redact=redact) for item in data]


# --- wire: request bodies -------------------------------------------------------------------


def _unstructure_camera(camera: CameraControl) -> dict[str, Any]:
    """``{"type": ..., "config": {six axes}}``; ``config`` only for ``simple`` (protocol 2.1)."""
    body: dict[str, Any] = {"type": camera.type.value}
    if camera.config is not None:
        body["config"] = _camera_config_dict(camera.config)
    return body


_camera_config_dict = make_dict_unstructure_fn(CameraConfig, converter)
converter.register_unstructure_hook(CameraConfig, _camera_config_dict)
converter.register_unstructure_hook(CameraControl, _unstructure_camera)

#: Fields left None are not sent (the server applies its defaults); ``extra`` is merged below.
_request_to_wire = make_dict_unstructure_fn(
    Text2VideoRequest,
    converter,
    _cattrs_omit_if_default=True,
    camera_control=override(unstruct_hook=_unstructure_camera),
    extra=override(omit=True),
)


def _unstructure_request(request: Text2VideoRequest) -> dict[str, Any]:
    body = _request_to_wire(request)
    if request.extra:
        body.update(request.extra)  # fields this SDK does not know yet, sent unchanged
    return body


converter.register_unstructure_hook(Text2VideoRequest, _unstructure_request)


def request_body(request: Text2VideoRequest) -> dict[str, Any]:
    """The create POST's JSON body: set fields only, ``duration`` as a string, extras merged."""
    return _unstructure_request(request)


# --- record form: to_dict / from_dict -------------------------------------------------------
#
# What a job store persists and a web app returns: attribute names (not wire names), enums as
# their values, datetimes as ISO 8601, nested objects as dicts, so ``json.dumps`` takes it and
# ``from_dict(to_dict(x)) == x``. Unlike the wire, a record is ours: a value of the wrong type
# is a mistake, reported as a ValidationError naming the field, the value and the rule.


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _video_list(videos: tuple[Video, ...]) -> list[dict[str, Any]]:
    return [video_to_dict(video) for video in videos]


video_to_dict = make_dict_unstructure_fn(Video, converter)

_task_record = make_dict_unstructure_fn(
    Task,
    converter,
    status=override(unstruct_hook=lambda status: status.value),
    videos=override(unstruct_hook=_video_list),
    created_at=override(unstruct_hook=_iso),
    updated_at=override(unstruct_hook=_iso),
)


def task_to_dict(task: Task) -> dict[str, Any]:
    """:meth:`Task.to_dict`. The failure reason was redacted when the task was decoded."""
    return _task_record(task)


def _record_text(field: str, *, optional: bool = False, non_empty: bool = False) -> Any:
    def hook(value: Any, _type: object = None) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (non_empty and not value):
            rule = "must be a non-empty string" if non_empty else "must be a string"
            raise ValidationError(field, value, rule + (" or null" if optional else ""))
        return value

    return hook


def _record_datetime(field: str) -> Any:
    def hook(value: Any, _type: object = None) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                pass
        raise ValidationError(field, value, "must be an ISO 8601 date and time, or null")

    return hook


def _record_status(value: Any, _type: object = None) -> TaskStatus:
    """Tolerant as on the wire: a status written by a newer SDK reads as UNKNOWN."""
    if not isinstance(value, str):
        raise ValidationError("status", value, "must be a task status string such as 'succeed'")
    return _STATUS_BY_VALUE.get(value, TaskStatus.UNKNOWN)


def _record_duration(value: Any, _type: object = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValidationError("duration", value, "must be a finite number of seconds, or null")


_video_from_record = make_dict_structure_fn(
    Video,
    converter,
    _cattrs_forbid_extra_keys=False,
    id=override(struct_hook=_record_text("id")),
    url=override(struct_hook=_record_text("url")),
    duration=override(struct_hook=_record_duration),
    watermark_url=override(struct_hook=_record_text("watermark_url", optional=True)),
)


def _required(data: Any, what: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValidationError(what, data, "must be a mapping (as to_dict returns)")
    for key in keys:
        if key not in data:
            raise ValidationError(key, None, f"is required in a {what} record")
    return data


def _record_videos(value: Any, _type: object = None) -> tuple[Video, ...]:
    if not isinstance(value, list | tuple):
        raise ValidationError("videos", value, "must be a list of video records")
    videos = []
    for index, item in enumerate(value):
        try:
            videos.append(_video_from_record(_required(item, "video", ("id", "url"))))
        except ValidationError as exc:
            raise ValidationError(f"videos[{index}].{exc.field}", exc.value, exc.rule) from None
    return tuple(videos)


_task_from_record = make_dict_structure_fn(
    Task,
    converter,
    # Ignored, not refused: a record a newer SDK wrote may carry fields this one lacks.
    _cattrs_forbid_extra_keys=False,
    task_id=override(struct_hook=_record_text("task_id", non_empty=True)),
    status=override(struct_hook=_record_status),
    status_message=override(struct_hook=_record_text("status_message")),
    external_task_id=override(struct_hook=_record_text("external_task_id", optional=True)),
    videos=override(struct_hook=_record_videos),
    created_at=override(struct_hook=_record_datetime("created_at")),
    updated_at=override(struct_hook=_record_datetime("updated_at")),
    final_unit_deduction=override(struct_hook=_record_text("final_unit_deduction", optional=True)),
    raw_status=override(struct_hook=_record_text("raw_status")),
)


def task_from_dict(data: Any) -> Task:
    """:meth:`Task.from_dict`: a record from :func:`task_to_dict` (or JSON of one) -> Task."""
    return _task_from_record(_required(data, "task", ("task_id", "status")))


def request_to_dict(request: Text2VideoRequest) -> dict[str, Any]:
    """:meth:`Text2VideoRequest.to_dict`: every field, ``extra`` kept apart (a deep copy).

    ``callback_url`` is kept: a store must resubmit the request as it was. It carries the
    callback's token, so a web app showing requests to others should drop it.
    """
    record = _request_record(request)
    record["extra"] = copy.deepcopy(dict(request.extra))
    return record


_request_record = make_dict_unstructure_fn(
    Text2VideoRequest,
    converter,
    camera_control=override(
        unstruct_hook=lambda camera: None if camera is None else _unstructure_camera(camera)
    ),
    extra=override(omit=True),
)


def _as_given(value: Any, _type: object = None) -> Any:
    """The request's own validators and converters judge the value, in the user's terms;
    cattrs' ``str`` hook would turn ``7`` into ``"7"`` and hide the mistake."""
    return value


_REQUEST_FIELDS = tuple(field.name for field in attrs.fields(Text2VideoRequest))
_AS_GIVEN: dict[str, Any] = {name: override(struct_hook=_as_given) for name in _REQUEST_FIELDS}

_request_from_record = make_dict_structure_fn(
    Text2VideoRequest,
    converter,
    _cattrs_forbid_extra_keys=False,  # checked below, naming the key
    **_AS_GIVEN,
)


def request_from_dict(data: Any) -> Text2VideoRequest:
    """:meth:`Text2VideoRequest.from_dict`: validated as the constructor validates."""
    record = _required(data, "request", ("prompt",))
    for key in record:
        if key not in _REQUEST_FIELDS:
            raise ValidationError(
                str(key),
                record[key],
                "is not a Text2VideoRequest field (fields the SDK does not know go in extra)",
            )
    return _request_from_record(record)


# --- envelopes ------------------------------------------------------------------------------


def _request_id(body: Mapping[str, Any], header_id: str | None) -> str | None:
    rid = body.get("request_id")
    return rid if isinstance(rid, str) and rid else header_id


def _error(
    cls: type[APIError],
    message: str,
    *,
    code: int | str | None,
    http_status: int,
    request_id: str | None,
    raw: bytes,
    redact: Redact,
) -> APIError:
    """The typed error, every piece of server-provided text redacted before it is cut."""
    return cls(
        redact(message),
        code=redact(code) if isinstance(code, str) else code,
        http_status=http_status,
        request_id=request_id and redact(request_id),
        body=snippet(redact(raw.decode("utf-8", "replace"))),
    )


def _normalise_code(code: Any) -> int | str | None:
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str):
        stripped = code.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        return stripped or None
    return None


_STATUS_IS_VERDICT = frozenset({401, 403, 429})


def decode_envelope(
    http_status: int,
    raw: bytes,
    *,
    query: bool = False,
    header_request_id: str | None = None,
    redact: Redact = no_redaction,
) -> Any:
    """Return the ``data`` of a successful answer; raise the typed error for anything else.

    Reads Kling's envelope ``{"code", "message", "request_id", "data"}``, CometAPI's
    ``{"error": {...}}`` and a new-api gateway's ``{"code": "task_not_exist"}``. A body that is
    not JSON becomes an :class:`APIError` subclass chosen by HTTP status where the status says
    enough (an HTML 502 is a server error, a bare 401 an authentication error), and a
    :class:`ResponseDecodeError` otherwise. ``query`` marks a single-task
    query, where "not found" codes raise :class:`TaskNotFoundError`. ``redact`` cleans every
    piece of the answer an error quotes (a server may echo the request's credentials).
    """
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
        parsed = False
    else:
        parsed = body is not None

    if not parsed or not isinstance(body, Mapping):
        what = "an empty body" if not raw.strip() else "a body that is not a JSON object"
        # The status alone is a verdict only where it is unambiguous; any other 4xx without
        # the envelope (a proxy page, a cut body) is undecodable, and reads retry those.
        if http_status in _STATUS_IS_VERDICT or http_status >= 500:
            cls = api_error_class(None, http_status, query=query)
            raise _error(
                cls,
                f"the server answered with {what}",
                code=None,
                http_status=http_status,
                request_id=header_request_id,
                raw=raw,
                redact=redact,
            )
        raise ResponseDecodeError(
            f"expected Kling's JSON envelope, got {what}",
            http_status=http_status,
            body=snippet(redact(raw.decode("utf-8", "replace"))),
        )

    request_id = _request_id(body, header_request_id)
    gateway = body.get("error")
    if isinstance(gateway, Mapping):
        code = _normalise_code(gateway.get("code")) or _normalise_code(gateway.get("type"))
        message = gateway.get("message")
        cls = api_error_class(code, http_status if http_status >= 400 else 500, query=query)
        raise _error(
            cls,
            message if isinstance(message, str) else "gateway error",
            code=code,
            http_status=http_status,
            request_id=request_id,
            raw=raw,
            redact=redact,
        )

    code = _normalise_code(body.get("code"))
    message = body.get("message")
    message = message if isinstance(message, str) else ""
    if code == 0 and http_status < 400:
        return body.get("data")
    if code is None and "code" not in body:
        if http_status >= 400:
            cls = api_error_class(None, http_status, query=query)
            raise _error(
                cls,
                message or "error without a code",
                code=None,
                http_status=http_status,
                request_id=request_id,
                raw=raw,
                redact=redact,
            )
        raise ResponseDecodeError(
            "the JSON answer has no code field",
            http_status=http_status,
            body=snippet(redact(raw.decode("utf-8", "replace"))),
        )
    cls = api_error_class(code, http_status, query=query)
    raise _error(
        cls,
        message or f"error code {code}",
        code=code,
        http_status=http_status,
        request_id=request_id,
        raw=raw,
        redact=redact,
    )
