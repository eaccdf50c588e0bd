"""KlingClient: the scope that owns the session, the credentials and the account's limits."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self

from ._api import Api
from ._auth import ENV_BASE_URL, auth_from
from ._create import CreateSettings
from ._errors import KlingError, ValidationError
from ._http import HttpTransport, Timeouts
from ._poll import PollPolicy
from ._profiles import COMETAPI, OFFICIAL, BackendProfile, ExternalIdLookup
from ._resources import Text2VideoResource
from ._retry import RetryPolicy

__all__ = ["COMETAPI_BASE_URL", "OFFICIAL_BASE_URL", "KlingClient"]

COMETAPI_BASE_URL = "https://api.cometapi.com/kling"
OFFICIAL_BASE_URL = "https://api-singapore.klingai.com"

_TEXT2VIDEO_PATH = "/v1/videos/text2video"
_LOOKUP_FORMS = ("query", "path", "path_flag")


class KlingClient:
    """An ``async with`` scope for one Kling account.

    Pass ``api_key`` for CometAPI (the default base URL), or ``access_key`` and ``secret_key`` for
    Kling's official API; with none, the ``KLING_API_KEY`` or ``KLING_ACCESS_KEY`` +
    ``KLING_SECRET_KEY`` environment variables are read, and ``KLING_BASE_URL`` overrides the
    default base URL. ``base_url`` is the prefix before ``/v1/...``.

    The backend profile (limits, list support) follows the auth mode, whatever the host;
    ``profile=`` overrides it. ``timeout`` bounds each read of an answer and ``connect_timeout``
    each connect, in seconds. ``settle_window`` is how long an ambiguous create keeps looking
    for its task before re-sending.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        base_url: str | None = None,
        profile: BackendProfile | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        settle_window: float = 5.0,
        external_id_lookup: ExternalIdLookup | None = "query",
        max_connections: int = 100,
    ) -> None:
        self._auth = auth_from(api_key=api_key, access_key=access_key, secret_key=secret_key)
        default_profile = COMETAPI if self._auth.kind == "bearer" else OFFICIAL
        self.profile = profile if profile is not None else default_profile
        if base_url is None:
            base_url = os.environ.get(ENV_BASE_URL) or (
                COMETAPI_BASE_URL if self._auth.kind == "bearer" else OFFICIAL_BASE_URL
            )
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValidationError("base_url", base_url, "must be an http:// or https:// URL")
        if external_id_lookup is not None and external_id_lookup not in _LOOKUP_FORMS:
            raise ValidationError(
                "external_id_lookup", external_id_lookup, f"must be one of {_LOOKUP_FORMS} or None"
            )
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not isinstance(value, int | float) or not value > 0:
                raise ValidationError(name, value, "must be a number of seconds > 0")
        if not isinstance(settle_window, int | float) or settle_window < 0:
            raise ValidationError(
                "settle_window", settle_window, "must be a number of seconds >= 0"
            )
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._transport = HttpTransport(
            self.base_url,
            timeouts=Timeouts(connect=connect_timeout, read=timeout),
            max_connections=max_connections,
        )
        self._api = Api(self._transport, self._auth, retry=self.retry)
        lookup = external_id_lookup if self.profile.external_id_lookup is not None else None
        self.text2video = Text2VideoResource(
            self._api,
            _TEXT2VIDEO_PATH,
            profile=self.profile,
            create_settings=CreateSettings(retry=self.retry, settle_window=settle_window),
            poll=self.poll,
            external_id_lookup=lookup,
        )
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise KlingError("a KlingClient can be entered once; make a new one")
        self._entered = True
        await self._transport.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session. Safe to call more than once."""
        await self._transport.aclose()

    def __repr__(self) -> str:
        return (
            f"KlingClient(base_url={self.base_url!r}, profile={self.profile.name!r}, "
            f"auth={self._auth.kind!r})"
        )
