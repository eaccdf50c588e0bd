"""Exactly-once task creation (protocol section 7).

A create POST that times out may still have created, and billed, a task. The only handle is
``external_task_id``, so every create carries one before its first POST, and each failure is
sorted by one question, "could the server have acted on it?":

* provably not sent (connect refused, DNS, connect timeout) or throttled (1302, 1303): re-POST;
* ambiguous (read timeout, dropped after sending, 5xx, an unparsable 2xx): look the task up by
  ``external_task_id`` for a settle window and adopt what is found; re-POST only if nothing is;
* a verdict (auth, account, invalid, policy): raise, never retry.

If the task cannot be looked up, the SDK raises :class:`AmbiguousSubmissionError` carrying the
``external_task_id`` instead of guessing.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import attrs

from ._api import Api
from ._errors import (
    AccountError,
    AmbiguousSubmissionError,
    AuthenticationError,
    ConcurrencyLimitError,
    InvalidRequestError,
    KlingError,
    PolicyError,
    ResponseDecodeError,
    ServerError,
    TaskNotFoundError,
    ThrottledError,
    TransportError,
)
from ._models import Task
from ._retry import RetryPolicy
from ._wire import structure_task

__all__ = ["CreateSettings", "create_task", "new_external_task_id"]

log = logging.getLogger("kling_async")

Lookup = Callable[[str], Awaitable[Task]]


def new_external_task_id() -> str:
    """A fresh id for a create that the caller did not name: random, so never reused."""
    return f"ka-{uuid.uuid4().hex}"


@attrs.frozen(kw_only=True)
class CreateSettings:
    """``settle_window``: seconds to keep looking for a task after an ambiguous create."""

    retry: RetryPolicy
    settle_window: float = 5.0
    retry_concurrency: bool = True


def _is_ambiguous(exc: BaseException) -> bool:
    if isinstance(exc, TransportError):
        return exc.request_sent
    return isinstance(exc, ServerError | ResponseDecodeError)


async def _settle(
    lookup: Lookup | None,
    external_task_id: str,
    window: float,
    cause: BaseException,
    rng: random.Random,
) -> Task | None:
    """Look for the task for up to ``window`` seconds; None if it never shows up."""
    if lookup is None:
        raise AmbiguousSubmissionError(external_task_id, cause)
    deadline = time.monotonic() + window
    pause = 0.05
    while True:
        try:
            return await lookup(external_task_id)
        except TaskNotFoundError:
            pass
        except KlingError as exc:
            # The lookup itself is broken or unsupported here: we cannot know, so we say so.
            raise AmbiguousSubmissionError(external_task_id, exc) from exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        await anyio.sleep(min(remaining, rng.uniform(pause / 2, pause)))
        pause = min(pause * 2, 2.0)


async def create_task(
    api: Api,
    path: str,
    body: dict[str, Any],
    *,
    external_task_id: str,
    lookup: Lookup | None,
    settings: CreateSettings,
    earlier_ambiguity: BaseException | None = None,
) -> Task:
    """POST ``body`` until one task exists for ``external_task_id``; return it.

    ``earlier_ambiguity`` resumes a create whose earlier call ended ambiguous: the task is
    looked up first, and a POST follows only if it is not found.
    """
    retry = settings.retry
    deadline = time.monotonic() + retry.timeout
    attempt = 0
    ambiguous: BaseException | None = earlier_ambiguity
    if earlier_ambiguity is not None:
        # The earlier call ended a while ago: one look is enough before deciding to POST.
        found = await _settle(lookup, external_task_id, 0.0, earlier_ambiguity, api.rng)
        if found is not None:
            return found
    while True:
        attempt += 1
        try:
            data = await api.send_once("POST", path, json_body=body)
            task = structure_task(data)
        except ConcurrencyLimitError as exc:
            if not settings.retry_concurrency:
                if ambiguous is not None:
                    # The caller retries later; it must know a task may already exist.
                    raise AmbiguousSubmissionError(external_task_id, ambiguous) from exc
                raise
            failure: KlingError = exc
        except (InvalidRequestError, AccountError, AuthenticationError, PolicyError) as exc:
            if ambiguous is not None:
                # An earlier attempt may have created (and billed) the task, and this verdict
                # may be about the repeat (a refused duplicate external_task_id, or the
                # resource pack the first task used up): find the first task before failing.
                found = await _settle(lookup, external_task_id, 0, ambiguous, api.rng)
                if found is not None:
                    return found
                if isinstance(exc, InvalidRequestError):
                    raise AmbiguousSubmissionError(external_task_id, ambiguous) from exc
            raise
        except (TransportError, ThrottledError, ServerError, ResponseDecodeError) as exc:
            failure = exc
        else:
            if task.external_task_id is None:
                task = attrs.evolve(task, external_task_id=external_task_id)
            return task

        if _is_ambiguous(failure):
            log.warning(
                "create for external_task_id=%s had an ambiguous outcome (%s); looking it up",
                external_task_id,
                type(failure).__name__,
            )
            found = await _settle(
                lookup, external_task_id, settings.settle_window, failure, api.rng
            )
            if found is not None:
                return found
            ambiguous = failure

        delay = retry.delay(
            attempt,
            rng=api.rng,
            retry_after=getattr(failure, "retry_after", None),
            throttled=isinstance(failure, ThrottledError),
        )
        if attempt >= retry.attempts or time.monotonic() + delay > deadline:
            if ambiguous is not None:
                raise AmbiguousSubmissionError(external_task_id, ambiguous) from failure
            raise failure
        await anyio.sleep(delay)
