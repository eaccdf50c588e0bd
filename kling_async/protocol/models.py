"""Frozen data: requests, tasks, videos. No IO, no wire names.

Rules that hold whatever the backend (types, enums, camera axes, ranges) are checked when a
request is built, so a bad value fails at the line that made it. Rules that depend on the
backend (prompt length, aspect ratios, durations per model) live in :mod:`._profiles` and run
before the first network call.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Self

import attrs

from kling_async._errors import ValidationError, redact_url

__all__ = [
    "AXES",
    "CameraConfig",
    "CameraControl",
    "CameraType",
    "Mode",
    "Task",
    "TaskStatus",
    "Text2VideoRequest",
    "Video",
    "WireInstant",
]


class TaskStatus(enum.StrEnum):
    """A task's lifecycle: ``submitted`` -> ``processing`` -> ``succeed`` | ``failed``.

    Kling spells success ``succeed``. A value Kling adds later becomes :attr:`UNKNOWN` (the raw
    string stays in :attr:`Task.raw_status`) and counts as not finished, so polling goes on
    instead of crashing.
    """

    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEEDED = "succeed"
    FAILED = "failed"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus:
        return cls.UNKNOWN

    @classmethod
    def parse(cls, value: str) -> TaskStatus:
        """Like ``TaskStatus(value)``, without the enum machinery (it runs for every poll)."""
        return _STATUS_BY_VALUE.get(value, cls.UNKNOWN)

    @property
    def is_terminal(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED)


_STATUS_BY_VALUE: dict[str, TaskStatus] = {s.value: s for s in TaskStatus}


class Mode(enum.StrEnum):
    """``std`` is faster (720p), ``pro`` is higher quality (1080p) and slower."""

    STD = "std"
    PRO = "pro"


class CameraType(enum.StrEnum):
    """The kind of camera movement: ``SIMPLE`` takes a :class:`CameraConfig` (one axis), the
    four presets take none."""

    SIMPLE = "simple"
    DOWN_BACK = "down_back"
    FORWARD_UP = "forward_up"
    RIGHT_TURN_FORWARD = "right_turn_forward"
    LEFT_TURN_FORWARD = "left_turn_forward"


AXES = ("horizontal", "vertical", "pan", "tilt", "roll", "zoom")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _axis_validator(field_prefix: str) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[float], value: Any) -> None:
        name = f"{field_prefix}.{attribute.name}"
        if not _is_number(value) or not math.isfinite(float(value)):
            raise ValidationError(name, value, "must be a finite number")
        if not -10 <= float(value) <= 10:
            raise ValidationError(name, value, "must be between -10 and 10")

    return check


@attrs.frozen
class CameraConfig:
    """The six camera axes of a ``simple`` camera move: each in [-10, 10], exactly one non-zero."""

    horizontal: float = attrs.field(default=0, validator=_axis_validator("camera_control.config"))
    vertical: float = attrs.field(default=0, validator=_axis_validator("camera_control.config"))
    pan: float = attrs.field(default=0, validator=_axis_validator("camera_control.config"))
    tilt: float = attrs.field(default=0, validator=_axis_validator("camera_control.config"))
    roll: float = attrs.field(default=0, validator=_axis_validator("camera_control.config"))
    zoom: float = attrs.field(default=0, validator=_axis_validator("camera_control.config"))

    def __attrs_post_init__(self) -> None:
        moving = [axis for axis in AXES if getattr(self, axis) != 0]
        if len(moving) != 1:
            raise ValidationError(
                "camera_control.config",
                {axis: getattr(self, axis) for axis in AXES if getattr(self, axis) != 0},
                f"exactly one of {', '.join(AXES)} must be non-zero (got {len(moving)})",
            )


def _to_camera_config(value: object) -> CameraConfig | None:
    if value is None or isinstance(value, CameraConfig):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in AXES)
        if unknown:
            raise ValidationError(
                f"camera_control.config.{unknown[0]}",
                value[unknown[0]],
                f"is not a camera axis; the axes are {', '.join(AXES)}",
            )
        return CameraConfig(**{str(k): v for k, v in value.items()})
    raise ValidationError(
        "camera_control.config", value, "must be a CameraConfig or a mapping of the six axes"
    )


def _to_camera_type(value: object) -> CameraType:
    if isinstance(value, str) and value in CameraType._value2member_map_:
        return CameraType(value)
    allowed = ", ".join(t.value for t in CameraType)
    raise ValidationError("camera_control.type", value, f"must be one of {allowed}")


@attrs.frozen
class CameraControl:
    """A camera move: a preset ``type``, or ``simple`` with a :class:`CameraConfig`.

    ``config`` is required for ``simple`` and must be absent for the presets.
    """

    type: CameraType = attrs.field(converter=_to_camera_type)
    config: CameraConfig | None = attrs.field(default=None, converter=_to_camera_config)

    def __attrs_post_init__(self) -> None:
        if self.type is CameraType.SIMPLE and self.config is None:
            raise ValidationError("camera_control.config", None, "is required when type is simple")
        if self.type is not CameraType.SIMPLE and self.config is not None:
            raise ValidationError(
                "camera_control.config",
                attrs.asdict(self.config),
                f"must be absent when type is {self.type.value} (only simple takes a config)",
            )


def _to_camera_control(value: object) -> CameraControl | None:
    if value is None or isinstance(value, CameraControl):
        return value
    if isinstance(value, Mapping):
        if "type" not in value:
            raise ValidationError("camera_control.type", None, "is required")
        extra = sorted(str(k) for k in value if k not in ("type", "config"))
        if extra:
            raise ValidationError(
                f"camera_control.{extra[0]}", value[extra[0]], "is not a camera_control field"
            )
        return CameraControl(type=value["type"], config=value.get("config"))
    raise ValidationError("camera_control", value, "must be a CameraControl or a mapping")


def _to_duration(value: object) -> str | None:
    """Kling wants a string ("5"); people write 5. Both become "5"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValidationError("duration", value, 'must be a whole number of seconds, e.g. 5 or "5"')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return str(int(value.strip()))
    raise ValidationError("duration", value, 'must be a whole number of seconds, e.g. 5 or "5"')


def _to_mode(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value in Mode._value2member_map_:
        return Mode(value).value
    raise ValidationError("mode", value, "must be std or pro")


def _check_text(name: str, *, required: bool) -> Any:
    def check(_inst: object, _attr: object, value: object) -> None:
        if value is None and not required:
            return
        if not isinstance(value, str):
            raise ValidationError(name, value, "must be a string")
        if required and not value.strip():
            raise ValidationError(name, value, "must not be empty")

    return check


def _check_optional_str(name: str, *, non_blank: bool = True) -> Any:
    def check(_inst: object, _attr: object, value: object) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise ValidationError(name, value, "must be a string")
        if non_blank and not value.strip():
            raise ValidationError(name, value, "must not be empty")

    return check


def _check_cfg_scale(_inst: object, _attr: object, value: Any) -> None:
    if value is None:
        return
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValidationError("cfg_scale", value, "must be a number between 0 and 1")
    if not 0 <= float(value) <= 1:
        raise ValidationError("cfg_scale", value, "must be between 0 and 1")


def _check_callback_url(_inst: object, _attr: object, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValidationError("callback_url", value, "must be an http:// or https:// URL")


def _freeze_extra(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError("extra", value, "must be a mapping of field name to JSON value")
    for key, item in value.items():
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise ValidationError(
                f"extra.{key}", item, "must be a JSON value (str, number, bool, None, list, dict)"
            ) from None
        if _depth(item) > _MAX_EXTRA_DEPTH:
            # Copied and converted by recursive code further on (the converter, job stores).
            raise ValidationError(
                f"extra.{key}", item, f"must nest at most {_MAX_EXTRA_DEPTH} lists or objects deep"
            )
    return dict(value)


_MAX_EXTRA_DEPTH = 32


def _depth(value: Any) -> int:
    """How deep lists and objects nest in a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            deepest = max(deepest, level)
            if level > _MAX_EXTRA_DEPTH:
                return level
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _redacted(url: str | None) -> str:
    """A URL for a repr: callback URLs carry a secret token, result URLs a signature."""
    return "None" if url is None else repr(redact_url(url) + ("?***" if "?" in url else ""))


_DECLARED = (
    "prompt",
    "negative_prompt",
    "model_name",
    "cfg_scale",
    "mode",
    "aspect_ratio",
    "duration",
    "camera_control",
    "callback_url",
    "external_task_id",
)


@attrs.frozen(kw_only=True)
class Text2VideoRequest:
    """One text-to-video job, as you mean it; the converter turns it into Kling's JSON.

    Fields left as None are not sent, so the server applies its defaults (``kling-v1``, ``std``,
    ``16:9``, ``"5"``). ``extra`` carries fields this SDK does not know yet (``sound``,
    ``multi_shot``, ...) to the server unchanged.
    """

    prompt: str = attrs.field(validator=_check_text("prompt", required=True))
    negative_prompt: str | None = attrs.field(
        default=None, validator=_check_optional_str("negative_prompt", non_blank=False)
    )
    model_name: str | None = attrs.field(default=None, validator=_check_optional_str("model_name"))
    cfg_scale: float | None = attrs.field(default=None, validator=_check_cfg_scale)
    mode: str | None = attrs.field(default=None, converter=_to_mode)
    aspect_ratio: str | None = attrs.field(
        default=None, validator=_check_optional_str("aspect_ratio")
    )
    duration: str | None = attrs.field(default=None, converter=_to_duration)
    camera_control: CameraControl | None = attrs.field(default=None, converter=_to_camera_control)
    callback_url: str | None = attrs.field(
        default=None, validator=_check_callback_url, repr=lambda _url: "***" if _url else "None"
    )
    external_task_id: str | None = attrs.field(
        default=None, validator=_check_optional_str("external_task_id")
    )
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_extra, hash=False)

    def __attrs_post_init__(self) -> None:
        for key in self.extra:
            if not isinstance(key, str):
                raise ValidationError("extra", key, "keys must be strings")
            if key in _DECLARED:
                raise ValidationError(
                    f"extra.{key}", self.extra[key], "duplicates a declared field; set it directly"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field by its name, ``duration`` as its string, ``camera_control``
        and ``extra`` as dicts, so a job store can persist it and :meth:`from_dict` rebuild it.

        ``callback_url`` is kept (a resubmission needs it) and holds the callback's token.
        """
        from kling_async.protocol.converter import request_to_dict  # the converter imports us

        return request_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The request :meth:`to_dict` described, checked as the constructor checks it
        (a :class:`ValidationError` names the field); unknown keys are refused."""
        from kling_async.protocol.converter import request_from_dict

        request = request_from_dict(data)
        assert isinstance(request, cls)
        return request

    @property
    def effective_model(self) -> str:
        return self.model_name or "kling-v1"

    @property
    def effective_mode(self) -> str:
        return self.mode or Mode.STD.value

    @property
    def effective_duration(self) -> str:
        return self.duration or "5"


@attrs.frozen
class Video:
    """One result video. ``url`` is hotlink-protected and deleted after 30 days: download it."""

    id: str  #: Kling's id of the video
    url: str = attrs.field(repr=_redacted)  #: where to download it (signed; kept out of reprs)
    duration: float | None = None  #: its length in seconds (not exactly the requested one)
    watermark_url: str | None = attrs.field(default=None, repr=_redacted)  #: with a watermark

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"id", "url", "duration", "watermark_url"}``."""
        from kling_async.protocol.converter import video_to_dict  # the converter imports us

        return video_to_dict(self)


class WireInstant:
    """An instant as the wire gives it (Unix milliseconds), on its way into a :class:`Task`:
    the converter passes one for ``created_at`` and ``updated_at``, and the task keeps the
    number (see ``_Instant``). Any other value is kept as given."""

    __slots__ = ("millis",)

    def __init__(self, millis: float) -> None:
        self.millis = millis


class _Given:
    """A timestamp passed as something other than a datetime or None: given back as it is
    (a float in the slot means wire milliseconds, so it cannot stand for itself)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


class _Instant:
    """``Task.created_at`` and ``updated_at``: an aware datetime (or None), as ever, but one
    from the wire is kept as its Unix milliseconds (a float: 24 bytes, shared by tasks of the
    same instant, where the datetime costs 48 each) and made when read. A client following
    100,000 tasks holds 200,000 timestamps that are seldom read; equality, hashing, the repr,
    ``to_dict()`` and pickling all read through here, so a task from the wire and one built
    with the same datetimes are equal and look the same."""

    __slots__ = ("_slot",)

    def __init__(self, slot: Any) -> None:
        self._slot = slot  # the slot's own descriptor, which attrs made

    def __get__(self, task: Task | None, owner: type | None = None) -> Any:
        if task is None:
            return self
        value = self._slot.__get__(task, owner)
        kind = type(value)
        if kind is float:
            return datetime.fromtimestamp(value / 1000, UTC)
        if kind is _Given:
            return value.value
        return value

    def __set__(self, task: Task, value: object) -> None:
        if type(value) is WireInstant:
            value = value.millis
        elif value is not None and not isinstance(value, datetime):
            value = _Given(value)
        self._slot.__set__(task, value)


@attrs.frozen(kw_only=True)
class Task:
    """A snapshot of a task as the server last described it."""

    task_id: str  #: Kling's id of the task (opaque: an 18-digit string in 2025-26)
    status: TaskStatus  #: where it stands; ``UNKNOWN`` for a value Kling added later
    status_message: str = ""  #: the failure reason of a failed task, else ``""``
    external_task_id: str | None = None  #: the id it was created with, if Kling echoed it
    videos: tuple[Video, ...] = ()  #: the results, once it succeeded
    created_at: datetime | None = None  #: when it was created (an aware datetime)
    updated_at: datetime | None = None  #: when it last changed (an aware datetime)
    final_unit_deduction: str | None = None  #: units charged, as Kling reports them (``"1"``)
    raw_status: str = ""  #: the status as the server spelled it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: attribute names, ``status`` as its value (``"succeed"``), datetimes as
        ISO 8601, videos as dicts; :meth:`from_dict` gives the task back, equal.

        Nothing secret is in it: the failure reason was redacted when the task was decoded
        (video URLs are signed, though: they let anyone fetch the file until they expire).
        """
        from kling_async.protocol.converter import task_to_dict  # the converter imports us

        return task_to_dict(self)

    @classmethod
    def from_wire(cls, body: bytes | str | Mapping[str, Any]) -> Self:
        """A bare task object in Kling's wire format (a callback's body, as JSON text or
        parsed), decoded by the SDK's own decoder; :class:`ResponseDecodeError` if it is not
        one. A snapshot from outside is a hint: pass it to ``kling.observe()``, which confirms
        it with an authenticated GET before anything changes."""
        from kling_async.protocol.converter import task_from_wire

        task = task_from_wire(body)
        assert isinstance(task, cls)
        return task

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The task :meth:`to_dict` described. A status this SDK does not know reads as
        UNKNOWN; keys it does not know are ignored (a newer SDK may have written them)."""
        from kling_async.protocol.converter import task_from_dict

        task = task_from_dict(data)
        assert isinstance(task, cls)
        return task

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def succeeded(self) -> bool:
        return self.status is TaskStatus.SUCCEEDED

    @property
    def failed(self) -> bool:
        return self.status is TaskStatus.FAILED

    @property
    def video(self) -> Video | None:
        """The first video, the one text-to-video makes."""
        return self.videos[0] if self.videos else None


for _name in ("created_at", "updated_at"):
    setattr(Task, _name, _Instant(Task.__dict__[_name]))
del _name
