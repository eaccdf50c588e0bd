"""Request validation: every rule fails before the network, naming field, value and rule."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async.protocol.converter import request_body
from kling_async.protocol.models import AXES


def test_minimal_request_sends_only_the_prompt() -> None:
    assert request_body(ka.Text2VideoRequest(prompt="A cat surfing")) == {"prompt": "A cat surfing"}


def test_full_request_body_uses_wire_names_and_string_duration() -> None:
    request = ka.Text2VideoRequest(
        prompt="p",
        negative_prompt="blur",
        model_name="kling-v2-master",
        cfg_scale=0.7,
        mode="pro",
        aspect_ratio="9:16",
        duration=10,
        camera_control=ka.CameraControl(type="simple", config=ka.CameraConfig(pan=-3.5)),
        callback_url="https://example.test/hook",
        external_task_id="job-1",
        extra={"sound": "on", "watermark_info": {"enabled": False}},
    )
    assert request_body(request) == {
        "prompt": "p",
        "negative_prompt": "blur",
        "model_name": "kling-v2-master",
        "cfg_scale": 0.7,
        "mode": "pro",
        "aspect_ratio": "9:16",
        "duration": "10",
        "camera_control": {
            "type": "simple",
            "config": {
                "horizontal": 0,
                "vertical": 0,
                "pan": -3.5,
                "tilt": 0,
                "roll": 0,
                "zoom": 0,
            },
        },
        "callback_url": "https://example.test/hook",
        "external_task_id": "job-1",
        "sound": "on",
        "watermark_info": {"enabled": False},
    }


@pytest.mark.parametrize("value", [5, "5", 5.0, " 5 "])
def test_duration_accepts_int_and_string(value: object) -> None:
    assert ka.Text2VideoRequest(prompt="p", duration=value).duration == "5"  # type: ignore[call-overload,arg-type,unused-ignore]


@pytest.mark.parametrize("value", [True, 5.5, "five", "", "-5", [5], "\u0665"])
def test_duration_rejects_non_whole_numbers(value: object) -> None:
    with pytest.raises(ka.ValidationError) as info:
        ka.Text2VideoRequest(prompt="p", duration=value)  # type: ignore[call-overload,arg-type,unused-ignore]
    assert info.value.field == "duration"
    assert "duration=" in str(info.value)
    assert "whole number" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": 7}, "prompt", "must be a string"),
        ({"prompt": "p", "mode": "turbo"}, "mode", "std or pro"),
        ({"prompt": "p", "cfg_scale": 1.5}, "cfg_scale", "between 0 and 1"),
        ({"prompt": "p", "cfg_scale": -0.1}, "cfg_scale", "between 0 and 1"),
        ({"prompt": "p", "cfg_scale": float("nan")}, "cfg_scale", "number"),
        ({"prompt": "p", "cfg_scale": True}, "cfg_scale", "number"),
        ({"prompt": "p", "callback_url": "ftp://x"}, "callback_url", "http"),
        ({"prompt": "p", "external_task_id": ""}, "external_task_id", "must not be empty"),
        ({"prompt": "p", "extra": {"prompt": "x"}}, "extra.prompt", "declared field"),
        ({"prompt": "p", "extra": {"seed": object()}}, "extra.seed", "JSON value"),
        ({"prompt": "p", "extra": {"seed": float("nan")}}, "extra.seed", "JSON value"),
        ({"prompt": "p", "camera_control": {"config": {}}}, "camera_control.type", "required"),
        (
            {"prompt": "p", "camera_control": {"type": "spin"}},
            "camera_control.type",
            "simple, down_back",
        ),
        (
            {"prompt": "p", "camera_control": {"type": "simple"}},
            "camera_control.config",
            "required when type is simple",
        ),
        (
            {"prompt": "p", "camera_control": {"type": "down_back", "config": {"zoom": 1}}},
            "camera_control.config",
            "must be absent",
        ),
        (
            {"prompt": "p", "camera_control": {"type": "simple", "config": {"zoom": 11}}},
            "camera_control.config.zoom",
            "between -10 and 10",
        ),
        (
            {"prompt": "p", "camera_control": {"type": "simple", "config": {"spin": 1}}},
            "camera_control.config.spin",
            "not a camera axis",
        ),
        (
            {"prompt": "p", "camera_control": {"type": "simple", "config": {}}},
            "camera_control.config",
            "exactly one",
        ),
    ],
)
def test_invalid_values_name_field_value_and_rule(
    kwargs: dict[str, object], field: str, rule: str
) -> None:
    with pytest.raises(ka.ValidationError) as info:
        ka.Text2VideoRequest(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert rule in str(info.value)
    assert str(info.value).startswith(f"{field}=")


def test_validation_error_is_a_value_error_and_truncates_huge_values() -> None:
    with pytest.raises(ValueError, match="prompt=") as info:
        ka.COMETAPI.validate(ka.Text2VideoRequest(prompt="x" * 10_000))
    assert len(str(info.value)) < 300


axis_value = st.one_of(st.integers(-10, 10), st.floats(-10, 10, allow_nan=False))


@given(st.dictionaries(st.sampled_from(AXES), axis_value))
def test_camera_config_accepts_exactly_one_nonzero_axis(axes: dict[str, float]) -> None:
    nonzero = [k for k, v in axes.items() if v != 0]
    if len(nonzero) == 1:
        config = ka.CameraControl(type="simple", config=axes).config
        assert config is not None
        assert getattr(config, nonzero[0]) == axes[nonzero[0]]
    else:
        with pytest.raises(ka.ValidationError, match="exactly one"):
            ka.CameraControl(type="simple", config=axes)


@given(st.sampled_from(AXES), st.floats(allow_nan=True, allow_infinity=True))
def test_camera_axis_range(axis: str, value: float) -> None:
    if value == value and -10 <= value <= 10 and value != 0:
        ka.CameraConfig(**{axis: value})
    else:
        with pytest.raises(ka.ValidationError):
            ka.CameraConfig(**{axis: value})


@pytest.mark.parametrize(
    ("profile", "prompt_max", "negative_max", "ratios"),
    [
        (ka.COMETAPI, 500, 200, {"16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3"}),
        (ka.OFFICIAL, 2500, 2500, {"16:9", "9:16", "1:1"}),
    ],
)
def test_profile_limits(
    profile: ka.BackendProfile, prompt_max: int, negative_max: int, ratios: set[str]
) -> None:
    profile.validate(ka.Text2VideoRequest(prompt="x" * prompt_max))
    with pytest.raises(ka.ValidationError, match=f"at most {prompt_max}") as info:
        profile.validate(ka.Text2VideoRequest(prompt="x" * (prompt_max + 1)))
    assert info.value.field == "prompt"
    profile.validate(ka.Text2VideoRequest(prompt="p", negative_prompt="n" * negative_max))
    with pytest.raises(ka.ValidationError, match=f"at most {negative_max}"):
        profile.validate(ka.Text2VideoRequest(prompt="p", negative_prompt="n" * (negative_max + 1)))
    for ratio in ["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9"]:
        request = ka.Text2VideoRequest(prompt="p", aspect_ratio=ratio)
        if ratio in ratios:
            profile.validate(request)
        else:
            with pytest.raises(ka.ValidationError) as info:
                profile.validate(request)
            assert info.value.field == "aspect_ratio"


@given(
    st.sampled_from(ka.KNOWN_MODELS),
    st.integers(min_value=0, max_value=20),
)
def test_durations_per_model(model: str, seconds: int) -> None:
    request = ka.Text2VideoRequest(prompt="p", model_name=model, duration=seconds)
    allowed = range(3, 16) if model == "kling-v3" else (5, 10)
    if seconds in allowed:
        ka.OFFICIAL.validate(request)
    else:
        with pytest.raises(ka.ValidationError, match=model):
            ka.OFFICIAL.validate(request)


def test_unknown_model_warns_but_passes() -> None:
    with pytest.warns(ka.UnknownModelWarning, match="kling-v9"):
        ka.COMETAPI.validate(ka.Text2VideoRequest(prompt="p", model_name="kling-v9", duration=7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ka.COMETAPI.validate(ka.Text2VideoRequest(prompt="p", model_name="kling-v2-6"))


@given(
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=30)},
        optional={
            "cfg_scale": st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3)),
            "mode": st.one_of(st.sampled_from(["std", "pro", "STD", ""]), st.integers()),
            "duration": st.one_of(st.integers(-5, 20), st.text(max_size=3), st.floats()),
            "aspect_ratio": st.one_of(st.sampled_from(["16:9", "4:3", ""]), st.none()),
        },
    )
)
def test_any_input_gives_a_request_or_a_validation_error(kwargs: dict[str, object]) -> None:
    """Never a TypeError or AttributeError from deep inside: a ValidationError or a request."""
    try:
        request = ka.Text2VideoRequest(**kwargs)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ka.UnknownModelWarning)
            ka.COMETAPI.validate(request)
    except ka.ValidationError as exc:
        assert exc.field in kwargs or exc.field.split(".")[0] in kwargs
        return
    body = request_body(request)
    assert body["prompt"] == kwargs["prompt"]
    if "duration" in body:
        assert isinstance(body["duration"], str)
