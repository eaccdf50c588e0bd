"""The one rule that turns credentials, a base URL and the environment into an account.

Explicit arguments win over the environment; the auth mode picks the backend: an ``api_key``
means CometAPI (its limits, its base URL), ``access_key`` + ``secret_key`` Kling's official API,
whatever the host, because which account is billed and which limits apply must never be a
guess. ``KLING_BASE_URL`` overrides the default base URL and ``profile=`` the profile.

Pure: the caller reads ``os.environ`` and passes it in, so the rule is tested with plain dicts
and the client, the batch tool and any other edge resolve an account the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

import attrs

from kling_async._errors import UsageError, ValidationError, redact_url
from kling_async.protocol.auth import (
    ENV_ACCESS_KEY,
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_SECRET_KEY,
    BearerAuth,
    JWTAuth,
)
from kling_async.protocol.profiles import COMETAPI, OFFICIAL, BackendProfile

__all__ = ["COMETAPI_BASE_URL", "OFFICIAL_BASE_URL", "Account", "resolve_account", "resolve_auth"]

#: The default base URL with ``api_key=``: the CometAPI gateway.
COMETAPI_BASE_URL: Final = "https://api.cometapi.com/kling"
#: The default base URL with ``access_key=`` + ``secret_key=``: Kling's official API (global;
#: China's is ``https://api-beijing.klingai.com``).
OFFICIAL_BASE_URL: Final = "https://api-singapore.klingai.com"


@attrs.frozen
class Account:
    """Who is calling (``auth``), where (``base_url``: the prefix before ``/v1/...``, without
    a trailing slash) and under which backend's rules (``profile``). No secret in its repr."""

    auth: BearerAuth | JWTAuth
    base_url: str
    profile: BackendProfile = attrs.field(repr=lambda profile: repr(profile.name))


def _from_env(environ: Mapping[str, str], name: str) -> str | None:
    """As the SDK has always read them: an empty (or blank) variable is unset."""
    value = environ.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _hidden(value: object) -> object:
    """What a credential error may show of the value: blanks and types, never a key."""
    return value if value is None or (isinstance(value, str) and not value.strip()) else "***"


def resolve_auth(
    *,
    api_key: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    environ: Mapping[str, str],
) -> BearerAuth | JWTAuth:
    """The credentials: the explicit ones, else ``KLING_API_KEY``, else the access + secret pair.

    Raises :class:`UsageError` when both kinds are given (which account would be billed?) and
    :class:`ValidationError` naming the field (or variable) that is missing or empty; a field
    of ``"credentials"`` means none were found anywhere.
    """
    explicit = not (api_key is None and access_key is None and secret_key is None)
    if not explicit:
        api_key = _from_env(environ, ENV_API_KEY)
        if api_key is None:
            access_key = _from_env(environ, ENV_ACCESS_KEY)
            secret_key = _from_env(environ, ENV_SECRET_KEY)
    if api_key is not None and (access_key is not None or secret_key is not None):
        raise UsageError("give either api_key (CometAPI) or access_key + secret_key, not both")
    if api_key is not None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValidationError("api_key", _hidden(api_key), "must be a non-empty string")
        return BearerAuth(api_key.strip())
    if access_key is not None or secret_key is not None:
        for name, value, variable in (
            ("access_key", access_key, ENV_ACCESS_KEY),
            ("secret_key", secret_key, ENV_SECRET_KEY),
        ):
            if explicit and value is not None and (not isinstance(value, str) or not value):
                raise ValidationError(name, _hidden(value), "must be a non-empty string")
            if value is None and explicit:
                raise ValidationError(
                    name,
                    None,
                    "is missing: the official API needs both access_key and secret_key "
                    f"(or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY})",
                )
            if value is None:
                raise ValidationError(
                    variable,
                    None,
                    f"is not set: Kling's API needs both {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}",
                )
        assert access_key is not None
        assert secret_key is not None
        return JWTAuth(access_key, secret_key)
    raise ValidationError(
        "credentials",
        None,
        "no credentials: pass api_key=... (CometAPI) or access_key=... and secret_key=... "
        f"(Kling), or set {ENV_API_KEY}, or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}",
    )


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a base URL, in words; None if nothing."""
    if any(character.isspace() or not character.isprintable() for character in url):
        return "must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"cannot be parsed ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if port == 0:
        return "has port 0, which is not a port"
    if parts.query or parts.fragment:
        return "must have no query or fragment (a base URL is the prefix before /v1/...)"
    return None


def check_base_url(url: object, field: str) -> str:
    """``url`` without its trailing slash, or :class:`ValidationError` naming ``field``.

    The error shows the URL without user info or query (either may hold a credential)."""
    if not isinstance(url, str):
        raise ValidationError(field, url, "must be an http:// or https:// URL")
    problem = _url_problem(url)
    if problem is not None:
        shown = redact_url(url) if "://" in url else url
        raise ValidationError(field, shown, problem)
    return url.rstrip("/")


def resolve_account(
    *,
    api_key: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    base_url: str | None = None,
    profile: BackendProfile | None = None,
    environ: Mapping[str, str],
) -> Account:
    """The account these arguments and ``environ`` describe (see the module docstring).

    A bad ``base_url`` is reported as field ``base_url``, a bad ``KLING_BASE_URL`` under the
    variable's name, so the message says where to fix it.
    """
    auth = resolve_auth(
        api_key=api_key, access_key=access_key, secret_key=secret_key, environ=environ
    )
    bearer = auth.kind == "bearer"
    if base_url is not None:
        url = check_base_url(base_url, "base_url")
    elif (from_env := _from_env(environ, ENV_BASE_URL)) is not None:
        url = check_base_url(from_env, ENV_BASE_URL)
    else:
        url = COMETAPI_BASE_URL if bearer else OFFICIAL_BASE_URL
    if profile is None:
        profile = COMETAPI if bearer else OFFICIAL
    elif not isinstance(profile, BackendProfile):
        raise ValidationError("profile", profile, "must be a BackendProfile (or None)")
    return Account(auth=auth, base_url=url, profile=profile)
