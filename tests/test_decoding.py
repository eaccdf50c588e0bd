"""Parsing: every body becomes a model or a typed error, never a stray KeyError."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async._errors import api_error_class
from kling_async.protocol.converter import decode_envelope, structure_task, structure_task_list

CREATED = {
    "code": 0,
    "message": "SUCCEED",
    "request_id": "3d67a2e2-1",
    "data": {
        "task_id": "866889456698785798",
        "task_status": "submitted",
        "task_info": {"external_task_id": "job-1"},
        "created_at": 1774711071284,
        "updated_at": 1774711071284,
    },
}


def decode(status: int, body: Any, **kwargs: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decode_envelope(status, raw, **kwargs)


def test_create_answer_parses() -> None:
    task = structure_task(decode(200, CREATED))
    assert task.task_id == "866889456698785798"
    assert task.status is ka.TaskStatus.SUBMITTED
    assert task.external_task_id == "job-1"
    assert task.created_at == datetime(2026, 3, 28, 15, 17, 51, 284000, tzinfo=UTC)
    assert task.created_at.tzinfo is not None
    assert task.videos == ()


def test_success_answer_with_string_duration_and_watermark() -> None:
    data = {
        "task_id": "1",
        "task_status": "succeed",
        "task_status_msg": "",
        "task_info": {},
        "task_result": {
            "videos": [
                {"id": "v1", "url": "https://cdn/x.mp4", "duration": "5.1", "watermark_url": "w"}
            ]
        },
        "final_unit_deduction": "1",
        "created_at": 1,
        "updated_at": 2,
        "something_new": {"x": 1},
    }
    task = structure_task(data)
    assert task.succeeded and task.is_terminal
    assert task.video == ka.Video(id="v1", url="https://cdn/x.mp4", duration=5.1, watermark_url="w")
    assert task.external_task_id is None
    assert task.final_unit_deduction == "1"


def test_failed_task_is_not_an_http_error() -> None:
    body = {
        "code": 0,
        "message": "success",
        "data": {
            "task_id": "2",
            "task_status": "failed",
            "task_status_msg": "Image pixel is invalid",
            "task_result": {},
        },
    }
    task = structure_task(decode(200, body))
    assert task.failed
    assert task.status_message == "Image pixel is invalid"


def test_unknown_status_is_tolerated_and_kept() -> None:
    task = structure_task({"task_id": "3", "task_status": "queued_v2"})
    assert task.status is ka.TaskStatus.UNKNOWN
    assert task.raw_status == "queued_v2"
    assert not task.is_terminal


def test_minimal_bodies_parse() -> None:
    task = structure_task({"task_id": "4"})
    assert task.status is ka.TaskStatus.UNKNOWN
    assert task.created_at is None
    assert structure_task({"task_id": 5, "task_info": None, "task_result": []}).task_id == "5"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, 1000, ka.AuthenticationError),
        (401, 1004, ka.AuthenticationError),
        (429, 1100, ka.AccountError),
        (429, 1101, ka.AccountError),
        (429, 1102, ka.AccountError),
        (403, 1103, ka.AccountError),
        (429, 1304, ka.AccountError),
        (400, 1200, ka.InvalidRequestError),
        (400, 1201, ka.InvalidRequestError),
        (404, 1203, ka.InvalidRequestError),
        (400, 1300, ka.PolicyError),
        (400, 1301, ka.PolicyError),
        (429, 1302, ka.RateLimitError),
        (429, 1303, ka.ConcurrencyLimitError),
        (500, 5000, ka.ServerError),
        (503, 5001, ka.ServerError),
        (504, 5002, ka.ServerError),
        (418, 9999, ka.InvalidRequestError),
        (502, 9999, ka.ServerError),
    ],
)
def test_code_table(status: int, code: int, cls: type[ka.APIError]) -> None:
    body = {"code": code, "message": "nope", "request_id": "rid-7"}
    with pytest.raises(cls) as info:
        decode(status, body)
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.http_status == status
    assert info.value.request_id == "rid-7"
    assert f"HTTP {status}" in str(info.value)
    assert "rid-7" in str(info.value)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"code": 1201, "message": "Task not found"}),
        (404, {"code": 1203, "message": "resource not found"}),
        (400, {"code": "task_not_exist", "message": "task_not_exist"}),
    ],
)
def test_not_found_variants_on_a_query(status: int, body: dict[str, Any]) -> None:
    with pytest.raises(ka.TaskNotFoundError):
        decode(status, body, query=True)
    with pytest.raises(ka.InvalidRequestError) as info:
        decode(status, body, query=False)
    assert not isinstance(info.value, ka.TaskNotFoundError)


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, "invalid_api_key", ka.AuthenticationError),
        (503, "model_not_found", ka.InvalidRequestError),
        (500, "invalid_request", ka.ServerError),
        (400, "invalid_request", ka.InvalidRequestError),
        (429, "something_else", ka.RateLimitError),
    ],
)
def test_cometapi_envelope(status: int, code: str, cls: type[ka.APIError]) -> None:
    body = {
        "error": {
            "message": "gateway says no",
            "type": "comet_api_error",
            "param": "",
            "code": code,
        }
    }
    with pytest.raises(cls) as info:
        decode(status, body)
    assert info.value.code == code
    assert info.value.http_status == status
    assert "gateway says no" in str(info.value)


@pytest.mark.parametrize(
    ("status", "raw", "cls"),
    [
        (502, b"<html><body>502 Bad Gateway</body></html>", ka.ServerError),
        (200, b"<html>oops</html>", ka.ResponseDecodeError),
        (200, b"", ka.ResponseDecodeError),
        (200, b'{"code":0,"data":{"task_id":"1","task_st', ka.ResponseDecodeError),
        (200, b"[1,2,3]", ka.ResponseDecodeError),
        (200, b'{"hello": "world"}', ka.ResponseDecodeError),
        (401, b"", ka.AuthenticationError),
        (429, b"slow down", ka.RateLimitError),
        (403, b"<html>Forbidden</html>", ka.AccountError),
        (400, b'{"code":1201,"message":"Task no', ka.ResponseDecodeError),
        (404, b"<html>Not Found</html>", ka.ResponseDecodeError),
        (200, b"\xff\xfe\x00garbage", ka.ResponseDecodeError),
        (200, b"[" * 100_000, ka.ResponseDecodeError),
    ],
)
def test_non_envelope_bodies(status: int, raw: bytes, cls: type[ka.KlingError]) -> None:
    with pytest.raises(cls) as info:
        decode_envelope(status, raw)
    assert info.value.http_status == status  # type: ignore[attr-defined]
    if b"html" in raw:
        assert "html" in str(info.value).lower() or "html" in info.value.body  # type: ignore[attr-defined]


def test_nonzero_code_with_http_200_is_an_error() -> None:
    with pytest.raises(ka.ConcurrencyLimitError):
        decode(200, {"code": 1303, "message": "parallel task over resource pack limit"})


def test_list_parses_and_rejects_non_arrays() -> None:
    tasks = structure_task_list([{"task_id": "1"}, {"task_id": "2", "task_status": "processing"}])
    assert [t.task_id for t in tasks] == ["1", "2"]
    with pytest.raises(ka.ResponseDecodeError):
        structure_task_list({"task_id": "1"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
task_like = st.fixed_dictionaries(
    {},
    optional={
        "task_id": json_values | st.text(min_size=1, max_size=20),
        "task_status": json_values
        | st.sampled_from(["submitted", "processing", "succeed", "failed"]),
        "task_status_msg": json_values,
        "task_info": json_values | st.fixed_dictionaries({"external_task_id": json_values}),
        "task_result": json_values
        | st.fixed_dictionaries(
            {
                "videos": st.lists(
                    st.dictionaries(st.sampled_from(["id", "url", "duration"]), json_values)
                )
            }
        ),
        "created_at": json_values,
        "updated_at": json_values,
    },
)


@given(
    st.integers(100, 599),
    st.fixed_dictionaries(
        {},
        optional={
            "code": json_values,
            "message": json_values,
            "request_id": json_values,
            "data": task_like | json_values,
            "error": json_values,
        },
    ),
)
def test_arbitrary_json_gives_a_model_or_a_typed_error(status: int, body: dict[str, Any]) -> None:
    try:
        task = structure_task(decode(status, body))
    except ka.KlingError:
        return
    assert isinstance(task, ka.Task)
    assert isinstance(task.task_id, str) and task.task_id
    assert isinstance(task.status, ka.TaskStatus)


@given(st.binary(max_size=64), st.integers(100, 599))
def test_arbitrary_bytes_give_a_typed_error_or_data(raw: bytes, status: int) -> None:
    try:
        decode_envelope(status, raw)
    except ka.KlingError as exc:
        # Undecodable, or a verdict the status and body give: either way it says which answer.
        assert isinstance(exc, ka.ResponseDecodeError | ka.APIError), repr(exc)
        assert exc.http_status == status


@given(json_values, st.integers(100, 599), st.booleans())
def test_error_class_lookup_is_total(code: Any, status: int, query: bool) -> None:
    assert issubclass(api_error_class(code, status, query=query), ka.APIError)
