"""Credentials: JWT claims and refresh, the env variables, and no secret in any repr."""

from __future__ import annotations

import warnings

import jwt
import pytest

import kling_async as ka
from kling_async.protocol.account import resolve_auth


def claims(header: str, secret: str) -> dict[str, int | str]:
    token = header.removeprefix("Bearer ")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short test secrets
        return jwt.decode(
            token, secret, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
        )


def test_jwt_carries_the_official_claims() -> None:
    now = [1_700_000_000.0]
    auth = ka.JWTAuth("ak-1", "sk-secret", clock=lambda: now[0])
    assert claims(auth.header(), "sk-secret") == {
        "iss": "ak-1",
        "exp": 1_700_000_000 + 1800,
        "nbf": 1_700_000_000 - 5,
    }


def test_jwt_is_cached_then_refreshed_before_expiry() -> None:
    now = [1_700_000_000.0]
    auth = ka.JWTAuth("ak-1", "sk-secret", clock=lambda: now[0])
    first = auth.header()
    now[0] += 1000
    assert auth.header() == first  # still far from expiry: reused
    now[0] += 501  # 1501 s old: inside the 300 s refresh margin
    second = auth.header()
    assert second != first
    assert claims(second, "sk-secret")["exp"] == int(now[0]) + 1800


def test_invalidate_forces_a_fresh_token() -> None:
    now = [1_700_000_000.0]
    auth = ka.JWTAuth("ak-1", "sk-secret", clock=lambda: now[0])
    first = auth.header()
    now[0] += 2
    assert auth.invalidate() is True
    assert auth.header() != first


def test_reprs_hide_secrets() -> None:
    bearer = ka.BearerAuth("sk-very-secret")
    assert "sk-very-secret" not in repr(bearer)
    token_auth = ka.JWTAuth("ak-visible-not", "sk-hidden")
    token_auth.header()
    assert "ak-visible-not" not in repr(token_auth)
    assert "sk-hidden" not in repr(token_auth)
    client = ka.KlingClient(api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(client)
    assert "sk-very-secret" not in str(vars(client).get("text2video"))


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ka.KlingError, match="KLING_API_KEY") as info:
        ka.KlingClient()
    assert "no credentials" in str(info.value)

    monkeypatch.setenv("KLING_API_KEY", "sk-from-env")
    client = ka.KlingClient()
    assert client.profile is ka.COMETAPI
    assert client.base_url == ka.COMETAPI_BASE_URL

    monkeypatch.delenv("KLING_API_KEY")
    monkeypatch.setenv("KLING_ACCESS_KEY", "ak")
    with pytest.raises(ka.ValidationError, match="KLING_SECRET_KEY") as missing:
        ka.KlingClient()
    assert missing.value.field == "KLING_SECRET_KEY"
    assert "is not set" in str(missing.value)
    monkeypatch.setenv("KLING_SECRET_KEY", "sk")
    monkeypatch.setenv("KLING_BASE_URL", "https://api-beijing.klingai.com/")
    client = ka.KlingClient()
    assert client.profile is ka.OFFICIAL
    assert client.base_url == "https://api-beijing.klingai.com"


def test_explicit_credentials_win_and_modes_do_not_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_API_KEY", "sk-env")
    environ = {"KLING_API_KEY": "sk-env"}
    assert resolve_auth(api_key=None, access_key="a", secret_key="s", environ=environ).kind == "jwt"
    with pytest.raises(ka.UsageError, match="not both"):
        ka.KlingClient(api_key="k", access_key="a", secret_key="s")
    client = ka.KlingClient(access_key="a", secret_key="s", profile=ka.COMETAPI)
    assert client.profile is ka.COMETAPI
    assert client.base_url == ka.OFFICIAL_BASE_URL


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_url": "api.example"}, "base_url"),
        ({"timeout": 0}, "timeout"),
        ({"settle_window": -1}, "settle_window"),
        ({"external_id_lookup": "header"}, "external_id_lookup"),
    ],
)
def test_client_settings_are_validated(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ka.ValidationError) as info:
        ka.KlingClient(api_key="k", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
