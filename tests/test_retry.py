"""Backoff arithmetic: bounded, jittered, honouring Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async.protocol.retry import parse_retry_after


@given(st.integers(1, 60), st.integers(0, 2**32))
def test_delay_is_exponential_with_jitter_and_capped(retry_number: int, seed: int) -> None:
    policy = ka.RetryPolicy(initial=0.5, maximum=8.0)
    delay = policy.delay(retry_number, rng=random.Random(seed))
    ceiling = min(8.0, 0.5 * 2 ** (retry_number - 1))
    assert ceiling / 2 <= delay <= ceiling


@given(st.integers(1, 10), st.integers(0, 2**32))
def test_throttled_waits_at_least_a_second(retry_number: int, seed: int) -> None:
    policy = ka.RetryPolicy(initial=0.01, maximum=8.0)
    assert policy.delay(retry_number, rng=random.Random(seed), throttled=True) >= 1.0


def test_retry_after_wins_when_longer() -> None:
    policy = ka.RetryPolicy(initial=0.1, maximum=1.0)
    assert policy.delay(1, retry_after=7.5) == 7.5
    assert policy.delay(1, retry_after=0.0) <= 0.1


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 2.5 ", 2.5),
        ("Wed, 25 Nov 2026 00:00:10 GMT", 10.0),
        ("Wed, 25 Nov 2026 00:00:00 GMT", 0.0),
        ("Tue, 24 Nov 2026 00:00:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("999999", 3600.0),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == seconds


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"timeout": 0}, {"initial": -1}])
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"RetryPolicy|attempts"):
        ka.RetryPolicy(**kwargs)  # type: ignore[arg-type]
