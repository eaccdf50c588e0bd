"""The hand-written task decoder the cattrs converter replaced, kept verbatim as the baseline of
``python -m benchmarks decode`` and the reference of tests/test_converter.py (the envelope
decoding was not replaced, so it is not kept here).

Its original docstring: the wire format, confined to one place: request bodies out, envelopes
and tasks in.

Plain functions over plain values (no IO), so every quirk is testable without a server:
``succeed`` spelled that way, ``duration`` as a string both ways, Unix milliseconds, the nested
``task_info`` / ``task_result``, two error envelopes, and bodies that are not JSON at all.
Anything the server sends becomes a model or a typed :class:`KlingError`, never a ``KeyError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs

from kling_async._errors import (
    ResponseDecodeError,
    no_redaction,
    snippet,
)
from kling_async.protocol.models import Task, TaskStatus, Text2VideoRequest, Video

__all__ = [
    "converter",
    "request_body",
    "structure_task",
    "structure_task_list",
]

converter = cattrs.Converter()

Redact = Callable[[str], str]


def _ms_to_datetime(value: Any, _type: object = None) -> datetime | None:
    """Unix milliseconds (int, float or digit string) to an aware UTC datetime; else None.

    A malformed timestamp is not worth losing the task over, so it reads as unknown.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _structure_duration(value: Any, _type: object = None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _structure_video(value: Any, _type: object = None) -> Video:
    if not isinstance(value, Mapping):
        raise TypeError("a video must be a JSON object")
    url = value.get("url")
    if not isinstance(url, str):
        raise TypeError("a video needs a string url")
    watermark = value.get("watermark_url")
    return Video(
        id=str(value.get("id", "")),
        url=url,
        duration=_structure_duration(value.get("duration")),
        watermark_url=watermark if isinstance(watermark, str) else None,
    )


def _structure_task(value: Any, _type: object = None) -> Task:
    if not isinstance(value, Mapping):
        raise TypeError("a task must be a JSON object")
    task_id = value.get("task_id")
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)
    if not isinstance(task_id, str) or not task_id:
        raise TypeError("a task needs a task_id")
    raw_status = value.get("task_status")
    raw_status = raw_status if isinstance(raw_status, str) else ""
    info = value.get("task_info")
    external = info.get("external_task_id") if isinstance(info, Mapping) else None
    result = value.get("task_result")
    videos = result.get("videos") if isinstance(result, Mapping) else None
    message = value.get("task_status_msg")
    deduction = value.get("final_unit_deduction")
    return Task(
        task_id=task_id,
        status=TaskStatus.parse(raw_status),
        raw_status=raw_status,
        status_message=message if isinstance(message, str) else "",
        external_task_id=external if isinstance(external, str) and external else None,
        videos=tuple(_structure_video(v) for v in videos) if isinstance(videos, list) else (),
        created_at=_ms_to_datetime(value.get("created_at")),
        updated_at=_ms_to_datetime(value.get("updated_at")),
        final_unit_deduction=None if deduction is None else str(deduction),
    )


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

    ``redact`` cleans the snippet of the answer the error quotes (it came from the server).
    """
    try:
        task: Task = converter.structure(data, Task)
    except (TypeError, ValueError, KeyError, cattrs.BaseValidationError) as exc:
        reason = redact(str(exc))
    else:
        if task.status_message and redact is not no_redaction:
            # The failure reason is server text that ends up in TaskFailedError and journals.
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


# --- requests -------------------------------------------------------------------------------


def _unstructure_request(request: Text2VideoRequest) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in attrs.fields(Text2VideoRequest):
        if field.name == "extra":
            continue
        value = getattr(request, field.name)
        if value is None:
            continue
        if field.name == "camera_control":
            camera: dict[str, Any] = {"type": value.type.value}
            if value.config is not None:
                camera["config"] = attrs.asdict(value.config)
            value = camera
        body[field.name] = value
    body.update(request.extra)
    return body


converter.register_unstructure_hook(Text2VideoRequest, _unstructure_request)


def request_body(request: Text2VideoRequest) -> dict[str, Any]:
    """The create POST's JSON body: set fields only, ``duration`` as a string, extras merged."""
    return converter.unstructure(request, Text2VideoRequest)  # type: ignore[no-any-return]


# --- envelopes ------------------------------------------------------------------------------
