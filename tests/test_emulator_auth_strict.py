"""``strict_auth``: each path family takes only the credential its real service takes."""

from __future__ import annotations

import time

import aiohttp
import pytest

import kling_async as ka
from kling_async.testing import Emulator
from tests.conftest import client_for
from tests.test_emulator import Api, assert_error, mint_jwt

pytestmark = pytest.mark.anyio

SCALE = 0.001


async def test_strict_pairs_keys_with_cometapi_and_jwts_with_the_official_api() -> None:
    async with Emulator(time_scale=SCALE, strict_auth=True) as emu, aiohttp.ClientSession() as s:
        jwt = mint_jwt(emu.access_key, emu.secret_key, time.time())
        comet_key = Api(s, emu, family="/kling/v1")
        comet_jwt = Api(s, emu, family="/kling/v1", token=jwt)
        official_jwt = Api(s, emu, family="/v1", token=jwt)
        official_key = Api(s, emu, family="/v1")

        for api in (comet_key, official_jwt):
            assert (await api.create())[0] == 200
            assert (await api.get())[0] == 200

        for attempt in (comet_jwt.create(), comet_jwt.get()):
            status, answer = await attempt
            assert status == 401
            assert set(answer) == {"error"}
            assert answer["error"]["code"] == "invalid_api_key"
            assert answer["error"]["type"] == "comet_api_error"

        for attempt in (official_key.create(), official_key.get("/123456789012345678")):
            status, answer = await attempt
            assert status == 401
            assert_error(answer, 1000, "JWT", "access key", "secret key")
        assert emu.stats.tasks_created == 2
        assert emu.stats.sent_errors[1000] == 2


async def test_strict_still_checks_what_it_accepts() -> None:
    async with Emulator(time_scale=SCALE, strict_auth=True) as emu, aiohttp.ClientSession() as s:
        status, answer = await Api(s, emu, family="/kling/v1", token="sk-wrong").create()
        assert status == 401
        assert answer["error"]["code"] == "invalid_api_key"
        forged = mint_jwt(emu.access_key, "x" * 40, time.time())
        status, answer = await Api(s, emu, family="/v1", token=forged).create()
        assert status == 401
        assert_error(answer, 1000, "signature")
        status, answer = await Api(s, emu, family="/v1", token=" ").create()
        assert status == 401
        assert_error(answer, 1002)  # "Bearer " with no token: malformed, checked first


async def test_without_strict_either_credential_works_on_either_family() -> None:
    async with Emulator(time_scale=SCALE) as emu, aiohttp.ClientSession() as s:
        jwt = mint_jwt(emu.access_key, emu.secret_key, time.time())
        for family in ("/v1", "/kling/v1"):
            for token in (emu.api_key, jwt):
                assert (await Api(s, emu, family=family, token=token).create())[0] == 200


async def test_the_sdk_under_strict_auth() -> None:
    """The SDK pointed at the right family works; a key sent to the official API fails."""
    async with Emulator(time_scale=SCALE, median_duration=0, strict_auth=True) as emu:
        request = ka.Text2VideoRequest(prompt="A cat surfing a wave")
        async with client_for(emu, base_url=emu.url + "/kling") as kling:
            task = await kling.text2video.create(request)
            assert (await kling.text2video.get(task.task_id)).task_id == task.task_id
        official = {"access_key": emu.access_key, "secret_key": emu.secret_key}
        async with client_for(emu, **official) as kling:
            await kling.text2video.create(request)
        async with client_for(emu) as kling:  # an API key on /v1: the official API's path
            with pytest.raises(ka.AuthenticationError):
                await kling.text2video.create(request)
        assert emu.stats.tasks_created == 2
