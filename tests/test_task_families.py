"""Task families: the resource is written once and bound to a family (text2video today)."""

from __future__ import annotations

import attrs
import pytest

import kling_async as ka
from kling_async.protocol.converter import request_body
from kling_async.protocol.families import TEXT2VIDEO, TaskFamily
from kling_async.testing import Emulator
from tests.conftest import client_for


def test_text2video_is_a_frozen_family() -> None:
    assert TEXT2VIDEO.name == "text2video"
    assert TEXT2VIDEO.path == "/v1/videos/text2video"
    assert TEXT2VIDEO.request_type is ka.Text2VideoRequest
    request = ka.Text2VideoRequest(prompt="p", duration=5)
    assert TEXT2VIDEO.body(request) == request_body(request) == {"prompt": "p", "duration": "5"}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        TEXT2VIDEO.path = "/elsewhere"  # type: ignore[misc]


def test_the_family_validates_against_the_profile() -> None:
    long = ka.Text2VideoRequest(prompt="x" * 501)
    TEXT2VIDEO.validate(ka.OFFICIAL, long)
    with pytest.raises(ka.ValidationError) as info:
        TEXT2VIDEO.validate(ka.COMETAPI, long)
    assert info.value.field == "prompt"


def test_the_resource_is_bound_to_its_family_and_refuses_other_requests() -> None:
    client = ka.KlingClient(api_key="sk-test")
    assert client.text2video.family is TEXT2VIDEO
    with pytest.raises(ka.ValidationError) as info:
        client.text2video.prepare({"prompt": "p"})
    assert info.value.field == "request"
    assert "Text2VideoRequest" in info.value.rule


@attrs.frozen
class _OtherRequest:
    prompt: str
    external_task_id: str | None = None


OTHER = TaskFamily(
    name="other",
    path="/v1/videos/other",
    request_type=_OtherRequest,
    validate=lambda _profile, _request: None,
    body=lambda request: {"prompt": request.prompt},
)


@pytest.mark.anyio
async def test_a_second_family_posts_its_own_body_to_its_own_path() -> None:
    """Nothing in the resource assumes text2video: a family with another path and request
    type gets its requests checked by type, and its create never reaches text2video."""
    from kling_async.http.resources import TaskResource

    async with Emulator(time_scale=0.001) as emu, client_for(emu) as kling:
        resource = TaskResource(
            kling.text2video._api,
            OTHER,
            profile=ka.COMETAPI,
            create_settings=kling.text2video._create_settings,
            poll=kling.poll,
            external_id_lookup=None,
        )
        prepared = resource.prepare(_OtherRequest(prompt="p"))
        assert prepared.external_task_id
        with pytest.raises(ka.ValidationError):
            resource.prepare(ka.Text2VideoRequest(prompt="p"))
        with pytest.raises(ka.KlingError):  # the emulator serves no such endpoint
            await resource.create_prepared(prepared, kling.text2video._create_settings)
        assert emu.stats.tasks_created == 0
        assert not any("text2video" in str(route) for route in emu.stats.requests_per_route)
