"""The SDK's model table and the emulator's stay in step.

The SDK (``kling_async/protocol/profiles.py``: ``KNOWN_MODELS``, ``BackendProfile.durations_for``,
the profiles' limits) and the emulator (``kling_async/testing/_validation.py``: ``KNOWN_MODELS``,
``modes_for``, ``clip_seconds_for``, its profiles) are two independent readings of Kling's
documentation, on purpose: the emulator checks the SDK instead of sharing its code. When Kling
adds a model or a clip length, both must learn it; these tests say which one is behind.
"""

from __future__ import annotations

import itertools

import pytest

import kling_async as ka
from kling_async.protocol import models, profiles
from kling_async.testing import _validation as emulator

SDK_TABLE = "kling_async/protocol/profiles.py (KNOWN_MODELS, BackendProfile.durations_for)"
EMULATOR_TABLE = "kling_async/testing/_validation.py (KNOWN_MODELS, modes_for, clip_seconds_for)"
SHARED_MODELS = sorted(set(profiles.KNOWN_MODELS) & set(emulator.KNOWN_MODELS))


def test_the_same_models() -> None:
    sdk, emu = set(profiles.KNOWN_MODELS), set(emulator.KNOWN_MODELS)
    assert not sdk - emu, (
        f"the SDK knows {sorted(sdk - emu)} but the emulator rejects them (400/1201): add them "
        f"to {EMULATOR_TABLE}"
    )
    assert not emu - sdk, (
        f"the emulator accepts {sorted(emu - sdk)} but the SDK warns UnknownModelWarning for "
        f"them: add them to {SDK_TABLE}"
    )
    assert len(profiles.KNOWN_MODELS) == len(sdk), f"a model is listed twice in {SDK_TABLE}"
    assert len(emulator.KNOWN_MODELS) == len(emu), f"a model is listed twice in {EMULATOR_TABLE}"


@pytest.mark.parametrize("model", SHARED_MODELS)
def test_the_same_durations(model: str) -> None:
    sdk = profiles.BackendProfile.durations_for(model)
    assert sdk is not None, f"{model} is in KNOWN_MODELS but {SDK_TABLE} gives it no durations"
    emu = emulator.clip_seconds_for(model)
    assert sorted(sdk, key=int) == sorted(emu, key=int), (
        f"{model}: the SDK allows durations {sorted(sdk, key=int)}, the emulator "
        f"{sorted(emu, key=int)}. Update whichever is behind Kling's documentation: the SDK's "
        f"{SDK_TABLE} or the emulator's {EMULATOR_TABLE}"
    )


@pytest.mark.parametrize("model", SHARED_MODELS)
def test_the_same_modes(model: str) -> None:
    sdk = sorted(mode.value for mode in ka.Mode)  # the SDK lets every model take every Mode
    emu = sorted(emulator.modes_for(model))
    assert sdk == emu, (
        f"{model}: the SDK sends modes {sdk} (kling_async.Mode in "
        f"kling_async/protocol/models.py), the emulator accepts {emu} ({EMULATOR_TABLE}); "
        "update whichever is behind"
    )


def test_the_same_defaults() -> None:
    """What a request that names no model, mode or duration gets on either side."""
    request = ka.Text2VideoRequest(prompt="a cat")
    sdk = (request.effective_model, request.effective_mode, request.effective_duration)
    emu = (emulator.DEFAULT_MODEL, emulator.DEFAULT_MODE, emulator.DEFAULT_DURATION)
    assert sdk == emu, (
        f"defaults (model, mode, duration): the SDK assumes {sdk} "
        f"(Text2VideoRequest.effective_* in kling_async/protocol/models.py), the emulator "
        f"{emu} (DEFAULT_* in kling_async/testing/_validation.py)"
    )


@pytest.mark.parametrize(
    ("sdk", "emu"), [(ka.COMETAPI, emulator.COMETAPI), (ka.OFFICIAL, emulator.OFFICIAL)]
)
def test_the_same_backend_limits(sdk: ka.BackendProfile, emu: emulator.Profile) -> None:
    assert sdk.name == emu.name
    pairs = {
        "prompt limit": (sdk.prompt_max, emu.prompt_limit),
        "negative prompt limit": (sdk.negative_prompt_max, emu.negative_prompt_limit),
        "aspect ratios": (sorted(sdk.aspect_ratios), sorted(emu.aspect_ratios)),
    }
    differ = {what: pair for what, pair in pairs.items() if pair[0] != pair[1]}
    assert not differ, (
        f"{sdk.name}: (SDK, emulator) disagree on {differ}: update the profile in "
        "kling_async/protocol/profiles.py or in kling_async/testing/_validation.py"
    )


def test_the_same_camera_moves() -> None:
    assert sorted(kind.value for kind in ka.CameraType) == sorted(emulator.CAMERA_TYPES), (
        "camera types differ: kling_async.CameraType (kling_async/protocol/models.py) vs "
        "CAMERA_TYPES in kling_async/testing/_validation.py"
    )
    assert sorted(models.AXES) == sorted(emulator.CAMERA_AXES), (
        "camera axes differ: AXES in kling_async/protocol/models.py vs CAMERA_AXES in "
        "kling_async/testing/_validation.py"
    )


def test_the_emulator_applies_the_table_it_is_compared_by() -> None:
    """Every (model, mode, duration) the SDK allows passes the emulator's create check, and a
    length outside the table fails it: the functions compared above are the ones it enforces."""
    for model in SHARED_MODELS:
        allowed = profiles.BackendProfile.durations_for(model) or ()
        for mode, duration in itertools.product(ka.Mode, allowed):
            body = {"prompt": "a cat", "model_name": model, "mode": mode.value}
            params = emulator.parse_create({**body, "duration": duration}, emulator.COMETAPI)
            assert (params.model_name, params.mode, params.duration) == (
                model,
                mode.value,
                duration,
            )
        with pytest.raises(emulator.InvalidRequest, match=r"^duration") as refused:
            emulator.parse_create(
                {"prompt": "a cat", "model_name": model, "duration": "2"}, emulator.COMETAPI
            )
        assert refused.value.code == 1201
        with pytest.raises(ka.ValidationError, match="duration"):
            ka.COMETAPI.validate(ka.Text2VideoRequest(prompt="a cat", model_name=model, duration=2))
