"""Review of b73065a (slot probes, the lean poller pool, unchanged answers reused).

Tests whose docstring says "fails on b73065a" pin a defect the review found (each was written
failing first, then fixed): a long-overdue task that made slot probes go every interval, and
a closed client's objects kept frozen while another client lived. The others pin what the
review tried to break and could not.
"""

from __future__ import annotations

import gc
import json
import math
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async._errors import KlingError
from kling_async.engine import limits
from kling_async.engine.collector import Collector
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.jobs import EventHub
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker
from kling_async.protocol.converter import answer_fingerprint, decode_envelope, structure_task
from kling_async.testing import Emulator

from .conftest import client_for

pytestmark = pytest.mark.anyio


# --- slot probes: the expected number of ends nobody noticed -----------------------------------


def _learned_tracker(median: float, sigma: float) -> tuple[Tracker, LearnedDurations]:
    """A tracker (with a pool that never runs) whose default class has learned 200 tasks
    log-normal around ``median`` with spread ``sigma`` (evenly spaced quantiles)."""
    policy = ka.PollPolicy(initial_estimate=median)
    durations = LearnedDurations(policy)
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), durations)
    PollerPool(None, policy, tracker)  # type: ignore[arg-type]  # never run
    n = 200
    for i in range(n):
        z = math.sqrt(2.0) * _erfinv(2.0 * (i + 0.5) / n - 1.0)
        durations.observe(("", "", ""), median * math.exp(sigma * z))
    return tracker, durations


def _erfinv(y: float) -> float:
    """erf⁻¹ by bisection (enough for evenly spaced quantiles)."""
    low, high = -6.0, 6.0
    for _ in range(100):
        mid = (low + high) / 2
        if math.erf(mid) < y:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def test_no_end_is_expected_in_no_time_even_for_a_task_long_past_its_class() -> None:
    """Fails on b73065a (found in review; fixed in the tree since): ``_ended_since`` gave
    0.5 for a task far past its class's durations, whatever the time elapsed since it was
    last known to run, so one such task alone passed the probe threshold right after a
    refused probe had shown it running."""
    tracker, durations = _learned_tracker(median=90.0, sigma=0.35)
    median, sigma = durations.model(("", "", "")).fit()
    assert 80 < median < 100 and 0.3 < sigma < 0.45  # what the class learned

    job = tracker.track("t-stuck")
    entry = tracker.entry(job)
    # A task 20x its class's median (a stuck task; real tails run past an hour).
    entry.started_at = time.monotonic() - 20 * median
    # A refused slot probe said just now that every task holding a slot still runs: no end
    # can have gone unnoticed since (the limiter passes that instant as ``running_at``).
    ends = tracker.unnoticed_ends(time.monotonic())
    assert ends < limits._PROBE_THRESHOLD, ends


async def test_a_refused_probe_is_not_followed_at_once_by_another_for_a_stuck_task() -> None:
    """Fails on b73065a (the same cut-off, seen from the limiter): after a refused probe
    showed the one task holding the slot running, the next probe went one probe_interval
    later, and so on for as long as the overdue task ran (a 1303 each)."""
    tracker: Tracker | None = None

    def unnoticed(since: float) -> float:
        assert tracker is not None
        return tracker.unnoticed_ends(since)

    slots = ka.AdaptiveLimit(None, probe_interval=0.001, unnoticed_ends=unnoticed)
    policy = ka.PollPolicy(initial_estimate=90.0)
    durations = LearnedDurations(policy)
    tracker = Tracker(EventHub(), slots, durations)
    PollerPool(None, policy, tracker)  # type: ignore[arg-type]  # never run
    n = 200
    for i in range(n):
        z = math.sqrt(2.0) * _erfinv(2.0 * (i + 0.5) / n - 1.0)
        durations.observe(("", "", ""), 90.0 * math.exp(0.35 * z))
    job = tracker.track("t-stuck")  # holds the one slot
    tracker.entry(job).started_at = time.monotonic() - 20 * 90.0  # 20x its class's median
    with anyio.fail_after(5):
        await slots.acquire("a")
    slots.answered("a", "refused")  # the account is full at 1: probes may go
    assert (slots.limit, slots.active) == (1, 1)
    with anyio.fail_after(5):
        await slots.acquire("p")  # nothing seen of it for ever: a probe is worth it
    assert slots.slot_probes == 1
    slots.answered("p", "refused")  # ... and it said the task still runs
    # In the next fifth of a second, the model expects about 0.003 ends of a task that old
    # (its class's hazard there): far below the probe threshold, so no second probe.
    with anyio.move_on_after(0.2) as waited:
        await slots.acquire("q")
    assert waited.cancelled_caught, slots.slot_probes


def test_an_overdue_task_within_the_model_expects_few_ends_in_a_moment() -> None:
    """The same question at 10x the median (not past the cut-off): nearly nothing, as it
    should be. (Shows the two tests above are about the cut-off alone.)"""
    tracker, durations = _learned_tracker(median=90.0, sigma=0.35)
    median, _ = durations.model(("", "", "")).fit()
    job = tracker.track("t-late")
    entry = tracker.entry(job)
    entry.started_at = time.monotonic() - 10 * median
    assert tracker.unnoticed_ends(time.monotonic()) < 0.01


# --- the collector: a closed client's objects ------------------------------------------------


async def test_a_closed_clients_objects_are_collected_while_another_client_lives(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on b73065a: gc.unfreeze ran only when the last freezing client closed, so a
    closed client's objects (cyclic: client <-> limiter lambda, job <-> entry) stayed frozen
    for as long as any other client that froze lived (a FastAPI app's own client)."""
    monkeypatch.setattr(Collector, "FREEZE_EVERY", 50)
    try:
        async with client_for(emu) as long_lived:
            kept = [long_lived.track(f"kept-{i}") for i in range(60)]
            await anyio.lowlevel.checkpoint()
            assert gc.get_freeze_count() > 0  # the long-lived client froze
            batch = client_for(emu)
            async with batch:
                done = [batch.track(f"batch-{i}") for i in range(60)]
                await anyio.lowlevel.checkpoint()
            gone = weakref.ref(batch)
            del batch, done
            gc.collect()
            # The batch client closed and nothing refers to it: it is garbage, and a full
            # pass frees it (as it does with Collector.FREEZE_EVERY = 0).
            assert gone() is None
            assert len(kept) == 60
    finally:
        gc.unfreeze()
        Collector._freezers = 0


async def test_without_freezing_a_closed_client_is_collected(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: the same clients, no freeze, the batch client freed."""
    monkeypatch.setattr(Collector, "FREEZE_EVERY", 0)
    async with client_for(emu) as long_lived:
        kept = [long_lived.track(f"kept-{i}") for i in range(60)]
        batch = client_for(emu)
        async with batch:
            done = [batch.track(f"batch-{i}") for i in range(60)]
            await anyio.lowlevel.checkpoint()
        gone = weakref.ref(batch)
        del batch, done
        gc.collect()
        assert gone() is None
        assert len(kept) == 60


# --- unchanged answers: what the review tried and could not break -----------------------------


def _decoded(body: bytes) -> tuple[str, Any]:
    try:
        return "task", structure_task(decode_envelope(200, body, query=True))
    except KlingError as exc:
        return "error", type(exc).__name__


_PIECES = [*'ab"\\:,{} \n\t', "request_id", "task_status", '"request_id"', '\\"', "é", "\u2028"]
_TEXT = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=8).map("".join), st.text(max_size=8))


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    """Envelopes in many spellings: key orders, separators, escapes, request ids anywhere
    (top level, nested, in keys that end with it, in values), a duplicate key at the end."""
    data: dict[str, Any] = {
        "task_id": draw(st.sampled_from(["t-1", "t-2"])),
        "task_status": draw(
            st.sampled_from(["submitted", "processing", "succeed", "failed", "request_id", ""])
        ),
    }
    if draw(st.booleans()):
        data["task_status_msg"] = draw(_TEXT)
    if draw(st.booleans()):
        data["task_info"] = {draw(st.sampled_from(["external_task_id", "request_id"])): draw(_TEXT)}
    if draw(st.booleans()):
        data[draw(st.sampled_from(["request_id", 'x"request_id']))] = draw(_TEXT)
    envelope: dict[str, Any] = {"code": 0, "message": draw(_TEXT), "data": data}
    if draw(st.booleans()):
        envelope["request_id"] = draw(_TEXT)
    items = draw(st.permutations(list(envelope.items())))
    comma, colon = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n", " :  ")]))
    ascii_only = draw(st.booleans())

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=ascii_only, separators=(comma, colon))

    parts = [dump(key) + colon + dump(value) for key, value in items]
    if draw(st.booleans()):
        key = draw(st.sampled_from(["request_id", "data", "code"]))
        value = draw(st.one_of(_TEXT, st.just({"task_id": "t-1", "task_status": "succeed"})))
        parts.append(dump(key) + colon + dump(value))
    return ("{" + comma.join(parts) + "}").encode()


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    first = draw(_bodies())
    how = draw(st.integers(0, 2))
    if how == 0:
        return first, draw(_bodies())
    if how == 1:  # a splice of a few bytes anywhere
        start = draw(st.integers(0, len(first)))
        end = draw(st.integers(start, min(len(first), start + 20)))
        middle = draw(
            st.one_of(
                st.binary(max_size=6),
                st.sampled_from([b'"', b"\\", b'"request_id"', b'":"', b"task_status", b" "]),
            )
        )
        return first, first[:start] + middle + first[end:]
    return first, first.replace(b"processing", b"succeed", 1)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_pairs())
def test_an_equal_fingerprint_never_stands_for_another_decoded_task(
    pair: tuple[bytes, bytes],
) -> None:
    """Whenever two bodies share a fingerprint, the later one decodes to the same task (or
    is one the decoder refuses: a request id with a raw control character, say, which the
    reuse then answers with the last task: the same task and status)."""
    first, second = pair
    fingerprint = answer_fingerprint(first)
    if fingerprint is None or fingerprint != answer_fingerprint(second):
        return
    was = _decoded(first)
    if was[0] == "task":
        now = _decoded(second)
        assert now == was or now[0] == "error", (first, second)


@pytest.mark.parametrize(
    "crafted",
    [
        # A request id that carries a status, escaped: no fingerprint at all (decoded).
        b'{"code":0,"request_id":"x\\",\\"task_status\\":\\"succeed","data":'
        b'{"task_id":"t-1","task_status":"processing"}}',
        # The status moved into a key that ends with "request_id": a different body.
        b'{"code":0,"request_id":"r","data":{"task_id":"t-1","task_status\\"request_id":'
        b'"succeed","task_status":"processing"}}',
        # Whitespace inside the request id's key/value separator.
        b'{"code":0,"request_id" : "r","data":{"task_id":"t-1","task_status":"succeed"}}',
        # A duplicate data key: the last one wins when decoded.
        b'{"code":0,"request_id":"r","data":{"task_id":"t-1","task_status":"processing"},'
        b'"data":{"task_id":"t-1","task_status":"succeed"}}',
        # Another task's id.
        b'{"code":0,"request_id":"r","data":{"task_id":"t-2","task_status":"processing"}}',
    ],
)
def test_crafted_bodies_are_decoded_not_reused(crafted: bytes) -> None:
    known = b'{"code":0,"request_id":"r","data":{"task_id":"t-1","task_status":"processing"}}'
    fingerprint = answer_fingerprint(crafted)
    assert fingerprint is None or fingerprint != answer_fingerprint(known)
