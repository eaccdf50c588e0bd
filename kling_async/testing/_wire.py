"""What goes on the wire: the envelopes and the task object, exactly as protocol section 3 shows.

Plain functions over plain values, so the shape of every answer is in one place.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from ._clock import EmulatedClock
from ._state import EmulatedTask


def dumps(payload: object) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def success(data: object) -> dict[str, Any]:
    """``{"code": 0, "message": "SUCCEED", "request_id": <uuid4>, "data": ...}``."""
    return {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}


def kling_error(code: int, message: str) -> dict[str, Any]:
    """Kling's error body: ``{"code", "message", "request_id"}`` (no ``data``)."""
    return {"code": code, "message": message, "request_id": str(uuid.uuid4())}


def cometapi_error(message: str, code: str) -> dict[str, Any]:
    """CometAPI's own gateway error envelope."""
    return {"error": {"message": message, "type": "comet_api_error", "param": "", "code": code}}


def task_info(task: EmulatedTask) -> dict[str, str]:
    if task.external_task_id is None:
        return {}
    return {"external_task_id": task.external_task_id}


def created(task: EmulatedTask, at: float, clock: EmulatedClock) -> dict[str, Any]:
    """The ``data`` of a create answer (the short form the docs show)."""
    return {
        "task_id": task.task_id,
        "task_status": task.status_at(at),
        "task_info": task_info(task),
        "created_at": clock.unix_ms(task.created_at),
        "updated_at": clock.unix_ms(task.changed_at(at)),
    }


def task_object(
    task: EmulatedTask, at: float, clock: EmulatedClock, video_url: Callable[[str], str]
) -> dict[str, Any]:
    """The full task object of a query answer, a list item, or a callback body, as of ``at``."""
    status = task.status_at(at)
    succeeded = status == "succeed"
    result: dict[str, Any] = {}
    if succeeded:
        result["videos"] = [
            {"id": video.id, "url": video_url(video.id), "duration": video.duration}
            for video in task.videos
        ]
    return {
        "task_id": task.task_id,
        "task_status": status,
        "task_status_msg": task.failure_message if status == "failed" else "",
        "task_info": task_info(task),
        "task_result": result,
        "final_unit_deduction": task.final_unit_deduction if succeeded else "0",
        "created_at": clock.unix_ms(task.created_at),
        "updated_at": clock.unix_ms(task.changed_at(at)),
    }
