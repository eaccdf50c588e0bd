"""``wait()`` and its deadline: a task that ended before it is returned whatever the poll
schedule, one still running raises with the last snapshot, and a bad timeout is refused
before any request."""

from __future__ import annotations

import math

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

REQUEST = ka.Text2VideoRequest(prompt="a lighthouse at dusk")


def requests_seen(emu: Emulator) -> int:
    return sum(emu.stats.requests_per_route.values())


async def test_a_task_that_ends_before_the_deadline_is_returned_at_it() -> None:
    """The task takes 1 s (0.1 s real); the default PollPolicy (tasks of minutes), scaled by
    the same factor, would poll it next long after the 3 s deadline (0.3 s real), so only the
    last look at the deadline can see it end."""
    scale = 0.1
    async with Emulator(time_scale=scale, median_duration=1.0, duration_sigma=0.0) as emu:
        async with client_for(emu, poll=ka.PollPolicy().scaled(scale)) as kling:
            task = await kling.text2video.create(REQUEST)
            with anyio.fail_after(10):
                final = await kling.text2video.wait(task.task_id, timeout=3 * scale)
    assert final.succeeded
    assert final.task_id == task.task_id
    assert 2 <= emu.stats.requests_per_route["get"] <= 3


async def test_a_task_still_running_at_the_deadline_raises_with_the_last_snapshot() -> None:
    async with Emulator(time_scale=SCALE, median_duration=1e6) as emu:  # ~17 real minutes
        async with client_for(emu) as kling:
            task = await kling.text2video.create(REQUEST)
            with anyio.fail_after(10), pytest.raises(ka.WaitTimeoutError) as info:
                await kling.text2video.wait(task.task_id, timeout=0.05)
    error = info.value
    assert isinstance(error, TimeoutError)
    assert error.task_id == task.task_id
    assert error.timeout == 0.05
    assert error.task is not None
    assert error.task.task_id == task.task_id
    assert not error.task.is_terminal
    assert error.task.status.value in str(error)
    assert emu.stats.requests_per_route["get"] >= 1


async def test_a_zero_timeout_looks_once() -> None:
    async with Emulator(time_scale=SCALE, median_duration=1e6) as emu:
        async with client_for(emu) as kling:
            task = await kling.text2video.create(REQUEST)
            with anyio.fail_after(10), pytest.raises(ka.WaitTimeoutError) as info:
                await kling.text2video.wait(task.task_id, timeout=0)
    assert info.value.task is not None
    assert emu.stats.requests_per_route["get"] == 1


BAD_TIMEOUTS = st.one_of(
    st.floats(max_value=-1e-12, allow_nan=False),  # negative, -inf included
    st.integers(max_value=-1),
    st.just(math.nan),
    st.text(max_size=5),  # "3" among them
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(max_magnitude=10),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bad=BAD_TIMEOUTS)
async def test_a_bad_timeout_is_refused_before_any_request(emu: Emulator, bad: object) -> None:
    before = requests_seen(emu)
    async with client_for(emu) as kling:
        with pytest.raises(ka.ValidationError) as info:
            await kling.text2video.wait("123456789012345678", timeout=bad)  # type: ignore[arg-type]
    assert info.value.field == "timeout"
    assert "timeout" in str(info.value)
    assert requests_seen(emu) == before


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan, "3"])
async def test_the_named_bad_timeouts_are_refused(emu: Emulator, bad: object) -> None:
    async with client_for(emu) as kling:
        with pytest.raises(ka.ValidationError, match="timeout") as info:
            await kling.text2video.wait("123456789012345678", timeout=bad)  # type: ignore[arg-type]
    assert info.value.field == "timeout"
    assert requests_seen(emu) == 0
