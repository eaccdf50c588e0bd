"""Seeded fault injection: the failures a client must survive, on demand and reproducibly.

Each request of a channel (``create`` POSTs, ``query`` GETs, file ``download``\\ s) draws one
uniform number from a random stream of its own, seeded from the emulator seed, and walks the
configured rates in :class:`FaultKind` order: the rates are exact per-request probabilities and
the same seed and request sequence inject the same faults. Faults draw from their own stream so
turning them on does not change the tasks' durations and outcomes.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

import attrs

Channel = Literal["create", "query", "download"]


class FaultKind(enum.Enum):
    """What can go wrong with one request. ``*_AFTER_COMMIT`` means the work was done first."""

    ERROR_5XX_BEFORE_COMMIT = "ERROR_5XX_BEFORE_COMMIT"
    """500/5000, 503/5001 or 504/5002 in the Kling envelope; nothing created."""
    DROP_AFTER_COMMIT = "DROP_AFTER_COMMIT"
    """The task is created (or the answer computed), then the connection closes with no reply."""
    STALL_AFTER_COMMIT = "STALL_AFTER_COMMIT"
    """The task is created (or the answer computed); the reply waits ``stall_seconds`` (real)."""
    TRUNCATED_JSON = "TRUNCATED_JSON"
    """The task is created (or the answer computed); the body is the JSON cut in half."""
    COMETAPI_ERROR_ENVELOPE = "COMETAPI_ERROR_ENVELOPE"
    """HTTP 500 with CometAPI's ``{"error": {...}}`` envelope; nothing created."""
    HTML_502 = "HTML_502"
    """HTTP 502 with an HTML "Bad Gateway" page, as a proxy in front would send; nothing created."""
    DROP_MID_DOWNLOAD = "DROP_MID_DOWNLOAD"
    """Downloads only: headers with the full Content-Length, part of the body, then the drop."""


BEFORE_COMMIT: Final = frozenset(
    {FaultKind.ERROR_5XX_BEFORE_COMMIT, FaultKind.COMETAPI_ERROR_ENVELOPE, FaultKind.HTML_502}
)
AFTER_COMMIT: Final = frozenset(
    {FaultKind.DROP_AFTER_COMMIT, FaultKind.STALL_AFTER_COMMIT, FaultKind.TRUNCATED_JSON}
)
_API_KINDS: Final = BEFORE_COMMIT | AFTER_COMMIT
APPLICABLE: Final[Mapping[Channel, frozenset[FaultKind]]] = MappingProxyType(
    {
        "create": _API_KINDS,
        "query": _API_KINDS,
        # A CDN serves files: no Kling JSON to truncate nor CometAPI envelope in front of it.
        "download": frozenset(
            {
                FaultKind.ERROR_5XX_BEFORE_COMMIT,
                FaultKind.HTML_502,
                FaultKind.DROP_AFTER_COMMIT,
                FaultKind.STALL_AFTER_COMMIT,
                FaultKind.DROP_MID_DOWNLOAD,
            }
        ),
    }
)


def _frozen_rates(rates: Mapping[FaultKind, float]) -> Mapping[FaultKind, float]:
    return MappingProxyType(dict(rates))


def _check_rates(channel: Channel) -> Callable[[Any, Any, Mapping[FaultKind, float]], None]:
    def check(_instance: Any, _attribute: Any, rates: Mapping[FaultKind, float]) -> None:
        total = 0.0
        for kind, rate in rates.items():
            if not isinstance(kind, FaultKind):
                raise TypeError(f"Faults.{channel}: keys must be FaultKind members, got {kind!r}")
            if kind not in APPLICABLE[channel]:
                raise ValueError(f"Faults.{channel}: {kind.name} does not apply to {channel}")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"Faults.{channel}[{kind.name}] must be in [0, 1], got {rate!r}")
            total += rate
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"Faults.{channel}: the rates add up to {total:g}, over 1 (they are exclusive "
                "per-request probabilities)"
            )

    return check


def _check_stall(_instance: object, _attribute: object, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Faults.stall_seconds must be a finite number >= 0, got {value!r}")


@attrs.frozen(hash=False)
class Faults:
    """Per-request fault probabilities by channel.

    ``create`` applies to create POSTs, ``query`` to every GET of the API (one task, by external
    id, the list), ``download`` to video files. On a create, the ``*_AFTER_COMMIT`` kinds apply
    only when a task was committed (a 200 answer); on a query they apply to whatever answer was
    computed. The rates of one channel are exclusive, so they must add up to at most 1.
    """

    create: Mapping[FaultKind, float] = attrs.field(
        factory=dict, converter=_frozen_rates, validator=_check_rates("create")
    )
    query: Mapping[FaultKind, float] = attrs.field(
        factory=dict, converter=_frozen_rates, validator=_check_rates("query")
    )
    download: Mapping[FaultKind, float] = attrs.field(
        factory=dict, converter=_frozen_rates, validator=_check_rates("download")
    )
    stall_seconds: float = attrs.field(default=30.0, validator=_check_stall)

    @classmethod
    def storm(cls, rate: float, *, stall_seconds: float = 30.0) -> Faults:
        """Every kind that applies to creates and queries, each at ``rate`` (so ``rate <= 1/6``)."""
        rates = {kind: rate for kind in FaultKind if kind in _API_KINDS}
        return cls(create=rates, query=rates, stall_seconds=stall_seconds)


_ORDER: Final = tuple(FaultKind)

SERVER_ERRORS: Final = (
    (500, 5000, "Internal server error"),
    (503, 5001, "Service temporarily unavailable"),
    (504, 5002, "Server internal timeout"),
)


class FaultInjector:
    """Draws the fault (if any) for each request, from a stream seeded apart from the tasks'."""

    def __init__(self, faults: Faults | None, *, seed: int) -> None:
        self.faults = faults
        self._rng = random.Random(f"kling-emulator-faults:{seed}")

    def draw(self, channel: Channel) -> FaultKind | None:
        faults = self.faults
        if faults is None:
            return None
        rates: Mapping[FaultKind, float] = getattr(faults, channel)
        if not rates:
            return None
        u = self._rng.random()
        cumulative = 0.0
        for kind in _ORDER:
            cumulative += rates.get(kind, 0.0)
            if u < cumulative:
                return kind
        return None

    def server_error(self) -> tuple[int, int, str]:
        """Which 5xx an ``ERROR_5XX_BEFORE_COMMIT`` is: (HTTP status, Kling code, message)."""
        return self._rng.choice(SERVER_ERRORS)

    @property
    def stall_seconds(self) -> float:
        return 0.0 if self.faults is None else self.faults.stall_seconds
