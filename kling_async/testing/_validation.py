"""Validation of the create body, with the codes and field-naming messages a client must handle.

Limits belong to the backend profile, and the profile follows the auth mode (bearer key =>
CometAPI's documented limits, JWT => the official API's), as protocol section 2 decides. Every
message starts with the field's name so a client (and a test) can tell which field was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

KNOWN_MODELS: Final = (
    "kling-v1",
    "kling-v1-6",
    "kling-v2-master",
    "kling-v2-1-master",
    "kling-v2-5-turbo",
    "kling-v2-6",
    "kling-v3",
)
MODES: Final = ("std", "pro")
CLIP_SECONDS: Final = ("5", "10")
CLIP_SECONDS_V3: Final = tuple(str(n) for n in range(3, 16))
CAMERA_TYPES: Final = (
    "simple",
    "down_back",
    "forward_up",
    "right_turn_forward",
    "left_turn_forward",
)
CAMERA_AXES: Final = ("horizontal", "vertical", "pan", "tilt", "roll", "zoom")


@attrs.frozen
class Profile:
    """The limits one backend documents."""

    name: str
    prompt_limit: int
    negative_prompt_limit: int
    aspect_ratios: tuple[str, ...]


DEFAULT_MODEL: Final = "kling-v1"
DEFAULT_MODE: Final = "std"
DEFAULT_DURATION: Final = "5"
DEFAULT_ASPECT_RATIO: Final = "16:9"


def modes_for(model_name: str) -> tuple[str, ...]:
    """The modes a known model accepts (every model takes both today)."""
    return MODES


def clip_seconds_for(model_name: str) -> tuple[str, ...]:
    """The clip lengths (seconds, as the wire's strings) a known model accepts."""
    return CLIP_SECONDS_V3 if model_name == "kling-v3" else CLIP_SECONDS


COMETAPI: Final = Profile("cometapi", 500, 200, ("16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3"))
OFFICIAL: Final = Profile("official", 2500, 2500, ("16:9", "9:16", "1:1"))


class InvalidRequest(Exception):
    """400 with code 1200 (the body is not a JSON object) or 1201 (a parameter is wrong)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class CreateParams:
    """The parts of a valid create body the emulator acts on (defaults filled in)."""

    model_name: str
    mode: str
    duration: str
    aspect_ratio: str
    callback_url: str | None
    external_task_id: str | None
    body: Mapping[str, Any] = attrs.field(repr=False)


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(1201, message)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional_string(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"{field} must be a string, got {type(value).__name__}")
    return value


def _choice(body: Mapping[str, Any], field: str, default: str, allowed: tuple[str, ...]) -> str:
    value = body.get(field, default)
    if not isinstance(value, str):
        raise _invalid(
            f"{field} must be a string (one of {', '.join(allowed)}), got {value!r} "
            f"({type(value).__name__})"
        )
    if value not in allowed:
        raise _invalid(f"{field} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_length(field: str, value: str, limit: int, profile: Profile) -> None:
    if len(value) > limit:
        raise _invalid(
            f"{field} is {len(value)} characters, over the {profile.name} limit of {limit}"
        )


def _check_camera_control(value: object) -> None:
    if not isinstance(value, Mapping):
        raise _invalid("camera_control must be an object")
    kind = value.get("type")
    if kind not in CAMERA_TYPES:
        raise _invalid(
            f"camera_control.type must be one of {', '.join(CAMERA_TYPES)}, got {kind!r}"
        )
    config = value.get("config")
    if kind != "simple":
        if config is not None:
            raise _invalid(f"camera_control.config must be absent when type is {kind!r}")
        return
    if not isinstance(config, Mapping):
        raise _invalid("camera_control.config is required (an object) when type is 'simple'")
    non_zero = 0
    for axis, amount in config.items():
        if axis not in CAMERA_AXES:
            raise _invalid(
                f"camera_control.config.{axis} is not an axis (axes: {', '.join(CAMERA_AXES)})"
            )
        if not _is_number(amount) or not -10 <= amount <= 10:
            raise _invalid(
                f"camera_control.config.{axis} must be a number in [-10, 10], got {amount!r}"
            )
        non_zero += amount != 0
    if non_zero != 1:
        raise _invalid(f"camera_control.config must have exactly one non-zero axis, got {non_zero}")


def parse_create(body: object, profile: Profile) -> CreateParams:
    """Check a decoded create body; raise :class:`InvalidRequest` naming the first bad field.

    Unknown extra fields are accepted and ignored, as the real API does for newer options.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(
            1200, f"Invalid request: the body must be a JSON object, got {type(body).__name__}"
        )

    prompt = body.get("prompt")
    if prompt is None:
        raise _invalid("prompt is required")
    if not isinstance(prompt, str):
        raise _invalid(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise _invalid("prompt must not be empty")
    _check_length("prompt", prompt, profile.prompt_limit, profile)

    negative_prompt = _optional_string(body, "negative_prompt")
    if negative_prompt is not None:
        _check_length("negative_prompt", negative_prompt, profile.negative_prompt_limit, profile)

    model_name = _choice(body, "model_name", DEFAULT_MODEL, KNOWN_MODELS)
    mode = _choice(body, "mode", DEFAULT_MODE, modes_for(model_name))
    aspect_ratio = _choice(body, "aspect_ratio", DEFAULT_ASPECT_RATIO, profile.aspect_ratios)
    duration = _choice(body, "duration", DEFAULT_DURATION, clip_seconds_for(model_name))

    if "cfg_scale" in body:
        cfg_scale = body["cfg_scale"]
        if not _is_number(cfg_scale) or not (math.isfinite(cfg_scale) and 0 <= cfg_scale <= 1):
            raise _invalid(f"cfg_scale must be a number in [0, 1], got {cfg_scale!r}")

    if body.get("camera_control") is not None:
        _check_camera_control(body["camera_control"])

    callback_url = _optional_string(body, "callback_url")
    external_task_id = _optional_string(body, "external_task_id")
    if external_task_id is not None and not external_task_id:
        raise _invalid("external_task_id must not be empty")

    return CreateParams(
        model_name=model_name,
        mode=mode,
        duration=duration,
        aspect_ratio=aspect_ratio,
        callback_url=callback_url,
        external_task_id=external_task_id,
        body=body,
    )
