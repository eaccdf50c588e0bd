"""The one rule for credentials, base URL and environment, tested with plain dicts (no IO)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async.protocol.account import (
    COMETAPI_BASE_URL,
    OFFICIAL_BASE_URL,
    resolve_account,
)

KEY = "sk-CANARY-account-0123456789"


def test_an_api_key_means_cometapi() -> None:
    account = resolve_account(api_key=KEY, environ={})
    assert account.auth.kind == "bearer"
    assert account.profile is ka.COMETAPI
    assert account.base_url == COMETAPI_BASE_URL == "https://api.cometapi.com/kling"


def test_an_access_and_secret_key_mean_the_official_api_whatever_the_host() -> None:
    account = resolve_account(
        access_key="ak", secret_key="sk", base_url="https://api.cometapi.com/kling/", environ={}
    )
    assert account.auth.kind == "jwt"
    assert account.profile is ka.OFFICIAL
    assert account.base_url == "https://api.cometapi.com/kling"
    assert resolve_account(access_key="ak", secret_key="sk", environ={}).base_url == (
        OFFICIAL_BASE_URL
    )


def test_the_environment_is_read_only_without_explicit_credentials() -> None:
    environ = {"KLING_API_KEY": "sk-env", "KLING_BASE_URL": "https://proxy.example/kling/"}
    account = resolve_account(environ=environ)
    assert account.auth.kind == "bearer" and account.base_url == "https://proxy.example/kling"
    explicit = resolve_account(access_key="ak", secret_key="sk", environ=environ)
    assert explicit.auth.kind == "jwt"
    assert explicit.base_url == "https://proxy.example/kling"  # KLING_BASE_URL still applies
    pair = {"KLING_ACCESS_KEY": " ak ", "KLING_SECRET_KEY": "sk\n", "KLING_API_KEY": "  "}
    assert resolve_account(environ=pair).profile is ka.OFFICIAL  # a blank variable is unset


def test_an_explicit_base_url_and_profile_win() -> None:
    account = resolve_account(
        api_key=KEY,
        base_url="http://127.0.0.1:8000",
        profile=ka.OFFICIAL,
        environ={"KLING_BASE_URL": "https://ignored.example"},
    )
    assert account.base_url == "http://127.0.0.1:8000"
    assert account.profile is ka.OFFICIAL


def test_both_credential_kinds_are_misuse() -> None:
    with pytest.raises(ka.UsageError, match="not both") as info:
        resolve_account(api_key=KEY, access_key="ak", secret_key="sk", environ={})
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "environ", "field", "words"),
    [
        ({}, {}, "credentials", "no credentials"),
        ({"api_key": "  "}, {}, "api_key", "non-empty"),
        ({"access_key": "ak"}, {}, "secret_key", "is missing"),
        ({"secret_key": "sk"}, {}, "access_key", "is missing"),
        ({}, {"KLING_ACCESS_KEY": "ak"}, "KLING_SECRET_KEY", "is not set"),
        ({}, {"KLING_SECRET_KEY": "sk"}, "KLING_ACCESS_KEY", "is not set"),
        ({"api_key": KEY, "base_url": "api.example"}, {}, "base_url", "http"),
        ({"api_key": KEY, "base_url": "ftp://x"}, {}, "base_url", "http"),
        ({"api_key": KEY, "base_url": "http://"}, {}, "base_url", "host"),
        ({"api_key": KEY, "base_url": "http://host:99999"}, {}, "base_url", "parsed"),
        ({"api_key": KEY, "base_url": "http://h/a b"}, {}, "base_url", "spaces"),
        ({"api_key": KEY, "base_url": "https://h/?k=1"}, {}, "base_url", "query"),
        ({"api_key": KEY}, {"KLING_BASE_URL": "not a url"}, "KLING_BASE_URL", "spaces"),
        ({"api_key": KEY}, {"KLING_BASE_URL": "ftp://x"}, "KLING_BASE_URL", "http"),
        ({"api_key": KEY, "profile": "official"}, {}, "profile", "BackendProfile"),
    ],
)
def test_every_error_names_the_field(
    kwargs: dict[str, Any], environ: dict[str, str], field: str, words: str
) -> None:
    with pytest.raises(ka.ValidationError) as info:
        resolve_account(**kwargs, environ=environ)
    assert info.value.field == field
    assert words in str(info.value)
    assert KEY not in str(info.value)


def test_a_base_url_error_shows_no_user_info_or_secret_query() -> None:
    with pytest.raises(ka.ValidationError) as info:
        resolve_account(api_key=KEY, base_url=f"https://user:{KEY}@h/?token={KEY}", environ={})
    assert KEY not in str(info.value) and KEY not in repr(info.value.value)


@given(st.text(max_size=20))
def test_a_key_never_shows_in_an_error_or_a_repr(key: str) -> None:
    secret = KEY + key
    for kwargs in ({"api_key": secret}, {"access_key": secret}, {"secret_key": secret}):
        try:
            account = resolve_account(**kwargs, environ={})  # type: ignore[arg-type]
        except ka.KlingError as exc:
            assert secret.strip() not in str(exc)
        else:
            assert secret.strip() not in repr(account)


def test_the_client_follows_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    client = ka.KlingClient(access_key="ak", secret_key="sk", base_url="https://h.example/")
    account = resolve_account(
        access_key="ak", secret_key="sk", base_url="https://h.example/", environ={}
    )
    assert (client.base_url, client.profile) == (account.base_url, account.profile)
    assert ka.COMETAPI_BASE_URL == COMETAPI_BASE_URL
    assert ka.OFFICIAL_BASE_URL == OFFICIAL_BASE_URL
