"""Shared fixtures: every async test runs on asyncio through the anyio pytest plugin.

Time is scaled: the emulator runs 1000x fast (a 90 s task takes 90 ms) and clients get the same
factor on their poll policy, so nothing waits on wall-clock minutes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

import kling_async as ka
from kling_async.testing import Emulator

from .cli_helpers import EmulatorProcess, emulator_process

SCALE = 0.001


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(time_scale=SCALE, seed=7) as emulator:
        yield emulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw aiohttp client, for tests of the emulator's wire behaviour."""
    async with aiohttp.ClientSession() as client:
        yield client


FAST_RETRY = ka.RetryPolicy(
    attempts=8, timeout=10.0, initial=0.01, maximum=0.1, throttle_minimum=0.01
)


def client_for(emulator: Emulator, **overrides: Any) -> ka.KlingClient:
    """A client tuned to the scaled emulator: fast polls, fast retries, no request cap."""
    settings: dict[str, Any] = {
        "api_key": emulator.api_key,
        "base_url": emulator.url,
        "poll": ka.PollPolicy().scaled(SCALE),
        "retry": FAST_RETRY,
        "settle_window": 0.2,
        "timeout": 2.0,
        "max_requests_per_second": None,
    }
    settings.update(overrides)
    if "access_key" in overrides:
        settings.pop("api_key")
    return ka.KlingClient(**settings)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[EmulatorProcess]:
    """An emulator in its own process, one per test module (the command-line tests)."""
    with emulator_process() as emu:
        yield emu


@pytest.fixture
def server(shared_server: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The module's emulator process, with its settings and faults reset around the test."""
    shared_server.reset()
    yield shared_server
    shared_server.reset()
