"""The cattrs converter decodes exactly as the hand-written decoder it replaced did.

``benchmarks/_legacy_decode.py`` is that decoder, verbatim. Every body, hostile or not, must
give the same Task or the same error message from both; every request the same POST body.
"""

from __future__ import annotations

import json
from typing import Any

import cattrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async as ka
from benchmarks import _legacy_decode as legacy
from kling_async._errors import Redactor
from kling_async.protocol import converter as current
from tests.test_records import requests

SECRET = "sk-CANARY-0123456789abcdef"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
timestamps = st.integers(-(10**16), 10**16) | st.floats() | st.from_regex(r"-?\d{1,14}(\.\d+)?")
videos = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "url": st.text(max_size=10) | json_values,
            "duration": st.sampled_from(["5.1", "10", "x", "inf", "nan"]) | json_values,
            "watermark_url": st.text(max_size=5) | json_values,
            "other": json_values,
        },
    )
    | json_values,
    max_size=3,
)
tasks = st.fixed_dictionaries(
    {},
    optional={
        "task_id": st.text(max_size=20) | st.integers() | json_values,
        "task_status": st.sampled_from(["submitted", "processing", "succeed", "failed", "new"])
        | json_values,
        "task_status_msg": st.text(max_size=30).map(lambda t: t + SECRET) | json_values,
        "task_info": st.fixed_dictionaries({}, optional={"external_task_id": json_values})
        | json_values,
        "task_result": st.fixed_dictionaries({}, optional={"videos": videos}) | json_values,
        "created_at": timestamps | json_values,
        "updated_at": timestamps | json_values,
        "final_unit_deduction": json_values,
        "something_new": json_values,
    },
)


def outcome(decode: Any, data: Any) -> Any:
    """The task, or the error's class and message: what callers can observe."""
    try:
        return decode(data, redact=Redactor(lambda: (SECRET,)))
    except ka.KlingError as exc:
        return type(exc), str(exc), getattr(exc, "body", None)


@settings(max_examples=400)
@given(tasks | json_values)
def test_any_task_body_decodes_as_the_legacy_decoder_did(data: Any) -> None:
    assert outcome(current.structure_task, data) == outcome(legacy.structure_task, data)


@given(st.lists(tasks, max_size=4) | json_values)
def test_any_list_body_decodes_as_the_legacy_decoder_did(data: Any) -> None:
    got = outcome(current.structure_task_list, data)
    assert got == outcome(legacy.structure_task_list, data)


@given(requests)
def test_every_request_body_is_the_legacy_body(request: ka.Text2VideoRequest) -> None:
    body = current.request_body(request)
    assert body == legacy.request_body(request)
    assert list(body) == list(legacy.request_body(request))  # same key order on the wire
    json.dumps(body, allow_nan=False)


def test_it_is_one_cattrs_converter_with_the_hooks_registered() -> None:
    assert isinstance(current.converter, cattrs.Converter)
    data = {"task_id": "1", "task_status": "succeed", "task_info": {"external_task_id": "e"}}
    task = current.converter.structure(data, ka.Task)
    assert task == current.structure_task(data)
    assert task.external_task_id == "e" and task.raw_status == "succeed"
    request = ka.Text2VideoRequest(prompt="p", duration=5, extra={"sound": "on"})
    assert current.converter.unstructure(request) == {"prompt": "p", "duration": "5", "sound": "on"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([], "a task must be a JSON object"),
        ({"task_status": "succeed"}, "a task needs a task_id"),
        ({"task_id": ""}, "a task needs a task_id"),
        ({"task_id": True}, "a task needs a task_id"),
        ({"task_id": "1", "task_result": {"videos": [7]}}, "a video must be a JSON object"),
        ({"task_id": "1", "task_result": {"videos": [{"id": "v"}]}}, "a video needs a string url"),
        ({"task_id": "1", "task_result": {"videos": [{"url": 5}]}}, "a video needs a string url"),
    ],
)
def test_a_body_that_is_not_a_task_names_what_is_wrong(data: Any, reason: str) -> None:
    with pytest.raises(ka.ResponseDecodeError) as info:
        current.structure_task(data, http_status=200)
    assert reason in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_wire_quirks() -> None:
    task = current.structure_task(
        {
            "task_id": 866889456698785798,
            "task_status": "succeed",
            "task_status_msg": None,
            "task_info": {"external_task_id": ""},
            "task_result": {"videos": [{"url": "https://cdn/x.mp4", "duration": "10"}]},
            "created_at": "1774711071284",
            "updated_at": True,
            "final_unit_deduction": 1,
        }
    )
    assert task.task_id == "866889456698785798"
    assert task.status_message == "" and task.external_task_id is None
    assert task.video == ka.Video(id="", url="https://cdn/x.mp4", duration=10.0)
    assert task.created_at is not None and task.created_at.year == 2026
    assert task.updated_at is None
    assert task.final_unit_deduction == "1"
