"""Defects a review of the Redis account found, each written failing first."""

from __future__ import annotations

import pytest

import kling_async as ka
from kling_async.redis import RedisAccount


@pytest.mark.parametrize(
    "url",
    [
        "user:s3cretpw@redis.internal:6379/0",  # the scheme forgotten
        "redis:/:s3cretpw@redis.internal/0",  # one slash short
    ],
)
def test_a_malformed_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ka.ValidationError) as caught:
        RedisAccount(url)
    assert "s3cretpw" not in str(caught.value)
    assert "s3cretpw" not in repr(caught.value)


@pytest.mark.anyio
@pytest.mark.parametrize("password", [None, "wrong-pw-5e0f2a"])
async def test_a_refused_password_is_said_at_once_without_the_password(
    password: str | None,
) -> None:
    """A server that answers and refuses is not "unreachable": no 10 s of retries, and the
    connection opened is closed (warnings are errors in this suite)."""
    import time

    import redis as redis_sync

    from .redis_helpers import redis_server

    with redis_server() as server:
        redis_sync.Redis(host="127.0.0.1", port=server.port).config_set(
            "requirepass", "right-pw-7c9b1d"
        )
        userinfo = f":{password}@" if password else ""
        client = ka.KlingClient(
            api_key="sk-x",
            base_url="http://127.0.0.1:9",
            account=RedisAccount(f"redis://{userinfo}127.0.0.1:{server.port}/0"),
        )
        started = time.monotonic()
        with pytest.raises(ka.JobStoreError, match="refused this client") as caught:
            async with client:
                pass
        assert time.monotonic() - started < 5
        assert "wrong-pw" not in str(caught.value) and "right-pw" not in str(caught.value)
