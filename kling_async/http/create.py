"""Exactly-once task creation (protocol section 7).

A create POST that times out may still have created, and billed, a task. The only handle is
``external_task_id``, so every create carries one before its first POST, and each failure is
sorted by one question, "could the server have acted on it?":

* provably not sent (connect refused, DNS, connect timeout) or throttled (1302, 1303): re-POST;
  a 1303 in particular is a concurrency signal, never an ambiguity: no task was created;
* ambiguous (read timeout, dropped after sending, 5xx, an unparsable 2xx): look the task up by
  ``external_task_id`` for a settle window and adopt what is found; re-POST only if nothing is;
* a re-sent create refused because its ``external_task_id`` already exists: that proves the
  first create landed and is only slow to show; keep looking it up (bounded backoff) and adopt
  it, never send again;
* a verdict (auth, account, invalid, policy): raise, never retry (after one last look for an
  earlier create that may have landed).

What is known about one job's creates lives in its :class:`CreateState`, which outlives a call
(the engine keeps it across rounds; ``resume`` starts it unsettled). If the task cannot be
looked up, :class:`AmbiguousSubmissionError` carries the ``external_task_id`` instead of a
guess. A re-POST after an unsettled outcome can make a second task only on a backend that
accepts a repeated ``external_task_id``; unless the backend is known to refuse repeats (its
profile says so, or it refused one during this client's life), such a job is marked
``possible_duplicate``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Protocol

import attrs

from kling_async._errors import (
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
    UnreachableError,
)
from kling_async.http.caller import Api
from kling_async.http.retrying import Retrying
from kling_async.protocol.converter import structure_task
from kling_async.protocol.models import Task
from kling_async.protocol.profiles import RepeatedExternalId
from kling_async.protocol.retry import RetryPolicy

__all__ = [
    "BackendFacts",
    "CreateSettings",
    "CreateState",
    "LandedUnseen",
    "Lookups",
    "create_task",
    "find_landed",
    "is_duplicate_refusal",
    "new_external_task_id",
]

log = logging.getLogger("kling_async")

#: What a refusal of a repeated id says ("already exists", "duplicate", "must be unique"). A
#: message that merely names the field (a length rule, an echoed body) is not one.
_DUPLICATE = re.compile(
    r"(?i)already\s+(?:exists?|used|taken|in\s+use|been\s+used)|duplicat|not\s+unique"
    r"|must\s+be\s+unique"
)
#: A task the server said exists is looked for this many retry timeouts at most, then the job
#: ends ambiguous (its id kept: a later run resumes it): a refusal misread as "exists" must
#: not leave a job waiting forever.
_LANDED_PATIENCE = 10
#: Looks for one task start this far apart and double (a settle window up to
#: ``_SETTLE_MAX_PAUSE``, a proven-landed search up to the policy's maximum).
_FIRST_PAUSE = 0.05
_SETTLE_MAX_PAUSE = 2.0
#: Looks are bounded by their deadline, not by a count.
_MAX_LOOKS = 1_000_000


class Lookups(Protocol):
    """Finding a task by ``external_task_id`` (``ExternalIdLookups`` in ``http.resources``)."""

    async def usable(self) -> bool:
        """Whether lookups work on this backend (learned; False: a miss proves nothing)."""
        ...

    async def find(self, external_task_id: str, *, offered: bool = True) -> Task:
        """The task, or :class:`TaskNotFoundError`."""
        ...


def new_external_task_id() -> str:
    """A fresh id for a create that the caller did not name: random, so never reused."""
    return f"ka-{uuid.uuid4().hex}"


def is_duplicate_refusal(exc: InvalidRequestError) -> bool:
    """Whether a refused create says its ``external_task_id`` is already taken."""
    return not isinstance(exc, TaskNotFoundError) and bool(_DUPLICATE.search(exc.message))


@attrs.define
class BackendFacts:
    """What the client knows about the backend's handling of repeated ids, for one client."""

    repeated_id: RepeatedExternalId | None = None

    @property
    def resend_is_safe(self) -> bool:
        """A re-POST cannot make a second task (the backend refuses or dedupes repeats)."""
        return self.repeated_id in ("reject", "return_first")


@attrs.frozen(kw_only=True)
class CreateSettings:
    """``settle_window``: seconds to keep looking for a task after an ambiguous create.

    ``retry_concurrency``: retry 1303 here (a direct ``create``), or raise it at once for the
    engine, which waits for a slot. ``hand_off_landed``: raise :class:`LandedUnseen` for a
    create proven landed but not visible yet, so that the engine looks for it without
    holding a create worker, instead of looking here until it shows.
    """

    retry: RetryPolicy
    settle_window: float = 5.0
    retry_concurrency: bool = True
    hand_off_landed: bool = False


@attrs.define
class CreateState:
    """One job's creates, across attempts, rounds and runs.

    ``unsettled``: an earlier POST may have created the task and no lookup has settled it
    (the cause, or a placeholder for "an earlier run may have sent it"). ``resent``: a POST
    went out while unsettled. ``proven``: the server refused a re-send as a repeated id, so
    the task exists. ``possible_duplicate``: the backend may hold two tasks for this job.
    """

    external_task_id: str
    unsettled: BaseException | None = None
    resent: bool = False
    proven: bool = False
    possible_duplicate: bool = False
    #: Calls of :func:`create_task` so far (the engine's rounds): every call after the first
    #: retries a failure, so its first request is paid from the retry budget.
    rounds: int = 0

    #: The unsettled outcome is an earlier run's, not one seen here.
    resumed: bool = False
    #: The task came from a lookup (or a refused repeat), not from a POST answered here.
    adopted: bool = False

    @property
    def earlier_runs_task(self) -> bool:
        """The task may be one an earlier run created, with callbacks of its own (or none):
        only a resumed create adopted without a POST of this run answering says so."""
        return self.resumed and self.adopted

    @classmethod
    def from_earlier_run(cls, external_task_id: str) -> CreateState:
        """A create an earlier run may already have sent."""
        return cls(
            external_task_id, unsettled=AmbiguousSubmissionError(external_task_id), resumed=True
        )


class LandedUnseen(KlingError):
    """A re-sent create was refused because its ``external_task_id`` exists: the task was
    created, and lookups do not show it yet. The engine keeps looking (``find_landed``)."""

    def __init__(self, state: CreateState) -> None:
        self.state = state
        super().__init__(
            f"the task for external_task_id={state.external_task_id!r} exists but does not "
            "show in lookups yet; still looking"
        )


def _is_ambiguous(exc: BaseException) -> bool:
    if isinstance(exc, TransportError):
        return exc.request_sent
    return isinstance(exc, ServerError | ResponseDecodeError)


def _look_up_policy(retry: RetryPolicy, first: float, maximum: float) -> RetryPolicy:
    """The schedule of looks for one task: ``first`` seconds, doubling up to ``maximum``, with
    full jitter; as many looks as the caller's deadline allows."""
    return attrs.evolve(retry, initial=first, maximum=max(first, maximum), attempts=_MAX_LOOKS)


async def _settle(
    api: Api,
    lookups: Lookups | None,
    state: CreateState,
    window: float,
    *,
    first_offered: bool = False,
) -> Task | None:
    """Look for the task for up to ``window`` seconds (a last look at its end); None if it
    never shows up.

    Each look after a failure is a retry and is paid from the client's retry budget, waiting
    for room as long as a read's retries would (a burst of dropped creates waits a round trip
    for its looks instead of failing); a look the budget cannot pay for, or a backend whose
    lookups do not work, leaves the outcome unknown: :class:`AmbiguousSubmissionError`.
    """
    cause = state.unsettled
    assert cause is not None
    external_task_id = state.external_task_id
    if lookups is None or not await lookups.usable():
        raise _given_up(state, cause)
    retrying = Retrying(
        _look_up_policy(api.retry, _FIRST_PAUSE, _SETTLE_MAX_PAUSE),
        budget=api.budget,
        deadline=time.monotonic() + window,
        rng=api.rng,
        last_try_at_deadline=True,
    )
    patience = api.retry.remaining(1)
    offered = first_offered
    # The first look follows the failed create at once; only the budget may hold it back.
    if not offered and not await retrying.pay(cause, wait=max(retrying.remaining, patience)):
        raise _given_up(state, cause)
    while True:
        try:
            return await lookups.find(external_task_id, offered=offered)
        except TaskNotFoundError:
            pass
        except (AuthenticationError, AccountError):
            # The account cannot be used (a refused key, arrears): looking again, or sending
            # the create, would meet the same answer. The caller stops as for a create's.
            raise
        except KlingError as exc:
            # The lookup itself failed or is unsupported here: we cannot know, so we say so.
            raise _given_up(state, exc) from exc
        offered = False
        if not await retrying.wait(cause, budget_wait=max(retrying.remaining, patience)):
            if retrying.stopped == "budget":
                raise _given_up(state, cause)
            return None


async def find_landed(
    api: Api, lookups: Lookups | None, state: CreateState, retry: RetryPolicy
) -> Task:
    """Look up a task the server said exists until it shows, with backoff up to
    ``retry.maximum`` seconds between looks. Never sends a create. Ends with the task, or with
    an error that makes looking pointless (lookups do not work here, the account was refused,
    the host is unreachable), or after ``_LANDED_PATIENCE`` retry timeouts with
    :class:`AmbiguousSubmissionError`, its id kept for a later lookup.

    Each look is a read of its own (paid and retried as one), so the looks between them are
    not charged to the retry budget again.
    """
    external_task_id = state.external_task_id
    retrying = Retrying(
        _look_up_policy(retry, _FIRST_PAUSE, retry.maximum),
        deadline=time.monotonic() + _LANDED_PATIENCE * retry.timeout,
        rng=api.rng,
    )
    looks = 0
    while True:
        if lookups is None or not await lookups.usable():
            raise _given_up(
                state,
                KlingError(
                    "the server says a task with this external_task_id exists, and this "
                    "backend cannot look tasks up by external_task_id"
                ),
            )
        looks += 1
        failure: KlingError
        try:
            task = await lookups.find(external_task_id)
        except TaskNotFoundError as exc:
            failure = exc
        except (AuthenticationError, AccountError, UnreachableError):
            raise
        except KlingError as exc:
            log.debug("looking up external_task_id=%s failed (%s)", external_task_id, exc)
            failure = exc
        else:
            log.info(
                "create for external_task_id=%s resolved: proven landed, adopted task %s "
                "after %d lookups",
                external_task_id,
                task.task_id,
                looks,
            )
            state.unsettled = None
            state.adopted = True
            return task
        if looks in (1, 10, 100) or looks % 1000 == 0:
            log.warning(
                "the task for external_task_id=%s exists but is not visible yet; still "
                "looking (%d lookups)",
                external_task_id,
                looks,
            )
        if not await retrying.wait(failure):
            raise _given_up(
                state,
                KlingError(
                    f"the server said a task with this external_task_id exists, and {looks} "
                    "lookups never found it"
                ),
            )


async def create_task(
    api: Api,
    path: str,
    body: dict[str, Any],
    *,
    state: CreateState,
    lookups: Lookups | None,
    settings: CreateSettings,
    facts: BackendFacts,
) -> Task:
    """POST ``body`` until one task exists for ``state.external_task_id``; return it.

    An unsettled ``state`` (a resumed job, or an earlier round that ended ambiguous) is
    looked up first, and a POST follows only if the task is not found. A later round of the
    same job is a retry: its first request is paid from the retry budget like any other
    (a resumed job's first round is a new request: an earlier run sent the last one).
    """
    retry = settings.retry
    retrying = api.retrying(retry)
    external_task_id = state.external_task_id
    state.rounds += 1
    first_round = state.rounds == 1
    if state.unsettled is not None:
        # The earlier call ended a while ago: one look is enough before deciding to POST.
        found = await _settle(api, lookups, state, 0.0, first_offered=first_round)
        if found is not None:
            return _found(state, found)
    elif first_round:
        api.offered()
    while True:
        if state.unsettled is not None:
            state.resent = True
        failure: KlingError
        try:
            data = await api.send_once("POST", path, json_body=body, attempt=retrying.failures + 1)
            task = structure_task(data, redact=api.redact)
        except ConcurrencyLimitError as exc:
            if not settings.retry_concurrency:
                raise  # no task was created; the caller waits for a slot (state kept)
            failure = exc
        except InvalidRequestError as exc:
            if state.unsettled is not None and is_duplicate_refusal(exc):
                # The repeat was refused because the first create landed: adopt, never resend.
                facts.repeated_id = facts.repeated_id or "reject"
                state.proven = True
                state.resent = state.possible_duplicate = False
                log.info(
                    "create for external_task_id=%s refused as a repeat: the first one "
                    "landed; looking it up",
                    external_task_id,
                )
                if settings.hand_off_landed:
                    raise LandedUnseen(state) from None
                return await find_landed(api, lookups, state, retry)
            if state.unsettled is not None:
                found = await _settle(api, lookups, state, 0.0)
                if found is not None:
                    return _found(state, found)
                raise _given_up(state, state.unsettled) from exc
            raise
        except (AccountError, AuthenticationError, PolicyError):
            if state.unsettled is not None:
                # An earlier attempt may have created (and billed) the task, and this verdict
                # may be about the repeat (the resource pack the first task used up): find
                # the first task before failing.
                found = await _settle(api, lookups, state, 0.0)
                if found is not None:
                    return _found(state, found)
            raise
        except (TransportError, ThrottledError, ServerError, ResponseDecodeError) as exc:
            failure = exc
        else:
            if task.external_task_id is None:
                task = attrs.evolve(task, external_task_id=external_task_id)
            if state.resent and not facts.resend_is_safe:
                state.possible_duplicate = True
                # A resumed job is flagged because its earlier run may have sent it: routine
                # after a crash, so said quietly; an unsettled outcome seen here is news.
                log.log(
                    logging.INFO if state.resumed else logging.WARNING,
                    "create for external_task_id=%s was sent after an unsettled outcome and "
                    "the backend may accept repeated ids: task %s may be a second task for it",
                    external_task_id,
                    task.task_id,
                )
            elif state.resent:
                log.info(
                    "create for external_task_id=%s resolved: re-sent (not found by lookup), "
                    "task %s",
                    external_task_id,
                    task.task_id,
                )
            state.unsettled = None
            return task

        if _is_ambiguous(failure):
            log.warning(
                "create for external_task_id=%s had an ambiguous outcome (%s); looking it up",
                external_task_id,
                type(failure).__name__,
            )
            state.unsettled = failure
            found = await _settle(api, lookups, state, settings.settle_window)
            if found is not None:
                return _found(state, found)

        if not await retrying.wait(failure):
            final = retrying.unreachable or failure
            if state.unsettled is not None:
                raise _given_up(state, state.unsettled) from final
            raise final


def _found(state: CreateState, task: Task) -> Task:
    """Adopt the task a look-up found for an unsettled create."""
    log.info(
        "create for external_task_id=%s resolved: found by lookup, task %s",
        state.external_task_id,
        task.task_id,
    )
    state.unsettled = None
    state.adopted = True
    return task


def _given_up(state: CreateState, cause: BaseException) -> AmbiguousSubmissionError:
    """The error for a create whose outcome stays unknown (said once, at INFO)."""
    log.info(
        "create for external_task_id=%s given up: outcome unknown (%s%s); look it up later",
        state.external_task_id,
        type(cause).__name__,
        ", proven landed" if state.proven else "",
    )
    return AmbiguousSubmissionError(state.external_task_id, cause)
