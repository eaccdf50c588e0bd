"""Who is calling: CometAPI-style bearer keys or official-API JWTs, verified like the servers do.

The auth mode also picks the validation profile (CometAPI limits for keys, official limits for
JWTs), because that is how a client can tell which backend it is talking to. JWT ``exp`` and
``nbf`` are checked against an injectable wall clock with no leeway, so tests can drive token
expiry without waiting, and a client that sends ``nbf = now - 5`` (as the protocol says) has
exactly the five seconds of skew it asked for.

By default either credential works on either path family, which keeps tests short. With
``strict`` the pairing is the real services': CometAPI's gateway (``/kling/...``) knows only its
bearer API keys, and Kling's official API (``/v1/...``) only JWTs minted from an access key and a
secret key, so a client that sends the wrong kind of credential to a backend fails as it would in
production instead of passing against the emulator.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Mapping, Sequence

import jwt


class AuthMode(enum.Enum):
    API_KEY = "api_key"
    JWT = "jwt"


class AuthError(Exception):
    """A rejected caller. A ``cometapi_code`` asks for CometAPI's error envelope, not Kling's."""

    def __init__(self, code: int, message: str, *, cometapi_code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cometapi_code = cometapi_code


class Authenticator:
    """Checks ``Authorization`` headers against the keys and access-key pairs it was given."""

    def __init__(
        self,
        *,
        api_keys: Sequence[str],
        access_keys: Mapping[str, str],
        wall_clock: Callable[[], float],
        strict: bool = False,
    ) -> None:
        self._strict = strict
        self._api_keys = frozenset(api_keys)
        self._access_keys = dict(access_keys)
        self._wall_clock = wall_clock
        self._tokens_seen: set[str] = set()

    @property
    def tokens_seen(self) -> int:
        """How many distinct JWTs were accepted."""
        return len(self._tokens_seen)

    def verify(self, header: str | None, *, cometapi_family: bool) -> AuthMode:
        """How the caller authenticated, or :class:`AuthError` with the code the real server uses.

        A bad bearer key on the ``/kling/...`` family answers in CometAPI's envelope, because that
        path family is CometAPI's gateway and its gateway rejects keys before Kling sees them.
        Under ``strict``, a JWT there is such a bad key, and a bearer key on ``/v1/...`` is
        refused by the official API's own check (code 1000).
        """
        if header is None or not header.strip():
            raise AuthError(1001, "Authorization header is empty")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(1002, "Authorization header is invalid: expected 'Bearer <token>'")
        is_jwt = token.count(".") == 2
        if self._strict and cometapi_family and is_jwt:
            raise AuthError(
                1000,
                "Invalid API key: CometAPI takes its bearer API keys (sk-...), not JWTs",
                cometapi_code="invalid_api_key",
            )
        if self._strict and not cometapi_family and not is_jwt:
            raise AuthError(
                1000,
                "Authentication failed: the official API takes JWTs minted from an access key "
                "and secret key, not API keys",
            )
        if is_jwt:
            return self._verify_jwt(token)
        if token in self._api_keys:
            return AuthMode.API_KEY
        if cometapi_family:
            raise AuthError(1000, "Invalid token", cometapi_code="invalid_api_key")
        raise AuthError(1000, "Authentication failed: unknown API key")

    def _verify_jwt(self, token: str) -> AuthMode:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise AuthError(1002, "Authorization header is invalid: malformed JWT") from None
        if header.get("alg") != "HS256":
            raise AuthError(1002, "Authorization header is invalid: the JWT must use HS256")
        issuer = claims.get("iss")
        secret = self._access_keys.get(issuer) if isinstance(issuer, str) else None
        if issuer is None or secret is None:
            raise AuthError(1000, "Authentication failed: unknown access key in iss")
        try:
            with warnings.catch_warnings():
                # A short test secret is the user's choice; the emulator must not turn PyJWT's
                # InsecureKeyLengthWarning into a test failure under `filterwarnings = error`.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=["HS256"],
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "require": ["iss", "exp"],
                    },
                )
        except jwt.InvalidSignatureError:
            raise AuthError(1000, "Authentication failed: JWT signature mismatch") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(1002, f"Authorization header is invalid: {exc}") from None

        now = self._wall_clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or (
            nbf is not None and not isinstance(nbf, int | float)
        ):
            raise AuthError(1002, "Authorization header is invalid: exp and nbf must be numbers")
        if nbf is not None and nbf > now:
            raise AuthError(1003, "Authorization is not yet valid (nbf is in the future)")
        if exp <= now:
            raise AuthError(1004, "Authorization has expired (exp is in the past)")
        self._tokens_seen.add(token)
        return AuthMode.JWT
