"""Records: ``to_dict`` is JSON-ready and ``from_dict`` gives the same object back.

A job store persists requests and tasks with these, and a web app returns them, so the record
uses attribute names (not Kling's wire names), enum values and ISO 8601 datetimes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async._errors import Redactor
from kling_async.protocol.converter import structure_task
from kling_async.protocol.models import AXES

_FIELDS = {field.name for field in ka.Text2VideoRequest.__attrs_attrs__}
text = st.text(max_size=12)
non_blank = st.text(min_size=1, max_size=12).filter(str.strip)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
moments = st.none() | st.datetimes(timezones=zones) | st.datetimes()
video_records = st.builds(
    ka.Video,
    id=text,
    url=text,
    duration=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    watermark_url=st.none() | text,
)
task_objects = st.builds(
    ka.Task,
    task_id=non_blank,
    status=st.sampled_from(ka.TaskStatus),
    status_message=text,
    external_task_id=st.none() | text,
    videos=st.lists(video_records, max_size=3).map(tuple),
    created_at=moments,
    updated_at=moments,
    final_unit_deduction=st.none() | text,
    raw_status=text,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=6,
)


@st.composite
def cameras(draw: st.DrawFn) -> ka.CameraControl:
    kind = draw(st.sampled_from(ka.CameraType))
    if kind is not ka.CameraType.SIMPLE:
        return ka.CameraControl(type=kind)
    axis = draw(st.sampled_from(AXES))
    value = draw(st.integers(-10, 10).filter(bool) | st.floats(-10, 10).filter(bool))
    return ka.CameraControl(type=kind, config={axis: value})


requests = st.builds(
    ka.Text2VideoRequest,
    prompt=non_blank,
    negative_prompt=st.none() | text,
    model_name=st.none() | non_blank,
    cfg_scale=st.none() | st.floats(0, 1) | st.sampled_from([0, 1]),
    mode=st.none() | st.sampled_from(["std", "pro"]),
    aspect_ratio=st.none() | non_blank,
    duration=st.none() | st.integers(1, 15) | st.integers(1, 15).map(str),
    camera_control=st.none() | cameras(),
    callback_url=st.none() | text.map(lambda t: "https://hooks.example/" + t),
    external_task_id=st.none() | non_blank,
    extra=st.dictionaries(
        text.filter(lambda k: k not in _FIELDS),
        json_values,
        max_size=3,
    ),
)


@given(task_objects)
def test_a_task_survives_its_record_and_json(task: ka.Task) -> None:
    record = task.to_dict()
    assert ka.Task.from_dict(record) == task
    assert ka.Task.from_dict(json.loads(json.dumps(record, allow_nan=False))) == task
    assert set(record) == {field.name for field in ka.Task.__attrs_attrs__}
    assert record["status"] == task.status.value and type(record["status"]) is str
    assert all(isinstance(v, dict) for v in record["videos"])


@given(video_records)
def test_a_video_record_is_its_fields(video: ka.Video) -> None:
    assert video.to_dict() == {
        "id": video.id,
        "url": video.url,
        "duration": video.duration,
        "watermark_url": video.watermark_url,
    }


@given(requests)
def test_a_request_survives_its_record_and_json(request: ka.Text2VideoRequest) -> None:
    record = request.to_dict()
    assert ka.Text2VideoRequest.from_dict(record) == request
    again = ka.Text2VideoRequest.from_dict(json.loads(json.dumps(record, allow_nan=False)))
    assert again == request
    assert again.extra == request.extra  # not part of ==, so checked on its own


def test_a_decoded_task_record_reads_like_the_model_not_the_wire() -> None:
    task = structure_task(
        {
            "task_id": "866889456698785798",
            "task_status": "succeed",
            "task_info": {"external_task_id": "job-1"},
            "task_result": {
                "videos": [{"id": "v1", "url": "https://cdn/x.mp4", "duration": "5.1"}]
            },
            "created_at": 1774711071284,
        }
    )
    assert task.to_dict() == {
        "task_id": "866889456698785798",
        "status": "succeed",
        "status_message": "",
        "external_task_id": "job-1",
        "videos": [
            {"id": "v1", "url": "https://cdn/x.mp4", "duration": 5.1, "watermark_url": None}
        ],
        "created_at": "2026-03-28T15:17:51.284000+00:00",
        "updated_at": None,
        "final_unit_deduction": None,
        "raw_status": "succeed",
    }


def test_a_request_record_keeps_extra_apart_and_is_a_copy() -> None:
    request = ka.Text2VideoRequest(
        prompt="p",
        duration=10,
        mode="pro",
        camera_control={"type": "down_back"},
        extra={"watermark_info": {"enabled": False}},
    )
    record = request.to_dict()
    assert record["duration"] == "10" and record["mode"] == "pro"
    assert record["camera_control"] == {"type": "down_back"}
    assert record["extra"] == {"watermark_info": {"enabled": False}}
    record["extra"]["watermark_info"]["enabled"] = True
    assert request.extra == {"watermark_info": {"enabled": False}}


def test_the_failure_reason_in_a_record_is_the_redacted_one() -> None:
    secret = "sk-CANARY-0123456789abcdef"
    task = structure_task(
        {"task_id": "1", "task_status": "failed", "task_status_msg": f"bad key {secret}"},
        redact=Redactor(lambda: (secret,)),
    )
    assert secret not in json.dumps(task.to_dict())


def test_an_unknown_status_in_a_record_is_tolerated() -> None:
    task = ka.Task.from_dict({"task_id": "1", "status": "paused", "raw_status": "paused", "new": 1})
    assert task.status is ka.TaskStatus.UNKNOWN and task.raw_status == "paused"


@pytest.mark.parametrize(
    ("data", "field", "rule"),
    [
        ({"status": "succeed"}, "task_id", "is required"),
        ({"task_id": "1"}, "status", "is required"),
        ({"task_id": "", "status": "succeed"}, "task_id", "non-empty string"),
        ({"task_id": "1", "status": 3}, "status", "status string"),
        ({"task_id": "1", "status": "succeed", "created_at": "soon"}, "created_at", "ISO 8601"),
        ({"task_id": "1", "status": "succeed", "created_at": 1774711071}, "created_at", "ISO 8601"),
        ({"task_id": "1", "status": "succeed", "videos": {}}, "videos", "list"),
        (
            {"task_id": "1", "status": "succeed", "videos": [{"id": "v"}]},
            "videos[0].url",
            "required",
        ),
        (
            {
                "task_id": "1",
                "status": "succeed",
                "videos": [{"id": "v", "url": "u", "duration": "5"}],
            },
            "videos[0].duration",
            "number",
        ),
        ([("task_id", "1")], "task", "mapping"),
    ],
)
def test_a_bad_task_record_names_field_value_and_rule(data: Any, field: str, rule: str) -> None:
    with pytest.raises(ka.ValidationError) as info:
        ka.Task.from_dict(data)
    assert info.value.field == field
    assert rule in info.value.rule


@pytest.mark.parametrize(
    ("data", "field", "rule"),
    [
        ({}, "prompt", "is required"),
        ({"prompt": 7}, "prompt", "must be a string"),
        ({"prompt": "p", "duration": 5.5}, "duration", "whole number"),
        ({"prompt": "p", "sound": "on"}, "sound", "go in extra"),
        ({"prompt": "p", "camera_control": {"type": "spin"}}, "camera_control.type", "one of"),
        ("prompt", "request", "mapping"),
    ],
)
def test_a_bad_request_record_names_field_value_and_rule(data: Any, field: str, rule: str) -> None:
    with pytest.raises(ka.ValidationError) as info:
        ka.Text2VideoRequest.from_dict(data)
    assert info.value.field == field
    assert rule in info.value.rule


def test_datetimes_stay_aware() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    task = ka.Task(task_id="1", status=ka.TaskStatus.SUBMITTED, created_at=moment)
    back = ka.Task.from_dict(task.to_dict())
    assert back.created_at == moment and back.created_at is not None
    assert back.created_at.utcoffset() == timedelta(0)
