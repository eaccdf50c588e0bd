"""The account seam: where the state one Kling account shares between its clients lives.

Kling counts parallel tasks per account, across all its keys, so several processes using one
account (four uvicorn workers, batch runs on two machines) must share what a single client
keeps to itself: the slots, the request budget, the learned durations, the jobs and their
events. ``KlingClient(account=...)`` takes an :class:`Account`; the client asks it for a
:class:`AccountBinding` (the four seams plus the link between clients) and runs the binding's
:meth:`~AccountBinding.serve` in its own task group, handing it an :class:`AccountMember`
through which the other clients' work reaches this one:

- **replicas**: a job another client owns is kept here as a replica (``kling.job(id)``,
  ``kling.jobs()``, ``events()`` and the FastAPI router see it; only its owner polls it);
- **hints**: a callback that lands here for a replica is forwarded to its owner;
- **adoption**: the jobs of a client that died (its leases expired) are taken over here:
  looked up, followed to their end, never created twice;
- **disowning**: a job this client may no longer follow (another took it) becomes a replica;
- **a stop**: an account-fatal answer seen by one client stops submission in every one.

The protocols carry no Redis: ``kling_async.redis.RedisAccount`` is one implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import anyio.abc
import attrs

from kling_async.engine.durations import DurationStats
from kling_async.engine.limits import RequestLimiter, SlotLimiter
from kling_async.engine.store import JobRecord, JobStore
from kling_async.protocol.models import Task
from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.retry import RetryPolicy

__all__ = ["Account", "AccountBinding", "AccountMember", "AccountSettings"]


@attrs.frozen(kw_only=True)
class AccountSettings:
    """What a client tells its account when it binds.

    ``fingerprint`` names the credentials without holding them (a short SHA-256 of the key's
    public part): clients with the same credentials share one account unless the account
    object names its own. The rest are the client's own settings: its slot ceiling
    (``max_active_tasks``, None while unknown), its request rate, its poll and retry policies,
    and its creates in flight (which the account keeps to while its limit is unknown).
    """

    fingerprint: str
    max_active_tasks: int | None
    max_requests_per_second: float | None
    poll: PollPolicy
    retry: RetryPolicy
    max_concurrent_submits: int = 4


@runtime_checkable
class AccountMember(Protocol):
    """The client, as its account binding sees it (implemented by :class:`KlingClient`)."""

    def replicate(self, records: Sequence[JobRecord]) -> None:
        """Jobs other clients own, as they are now: kept (or updated) here as replicas."""
        ...

    def adopt(self, records: Sequence[JobRecord]) -> None:
        """Jobs this client now owns (their owner died): follow or submit them again, as a
        restart from a job store would."""
        ...

    def disown(self, job_ids: Iterable[str]) -> None:
        """Jobs another client owns now: stop following them; they stay as replicas."""
        ...

    def hint(self, task: Task) -> None:
        """A snapshot of a task seen by another client (a callback): a hint, confirmed here."""
        ...

    def stop(self, error: BaseException) -> None:
        """Another client met an account-fatal answer: stop submitting."""
        ...

    def owned(self) -> list[JobRecord]:
        """Every job this client owns now (the shared state was lost: write them again)."""
        ...


@runtime_checkable
class AccountBinding(AbstractAsyncContextManager["AccountBinding"], Protocol):
    """One client's binding to a shared account: the engine's four seams, and the link.

    Entered by the client before its task group exists and left after it ends (connections
    open and close there); :meth:`serve` runs in the client's task group for the client's
    life and calls ``task_status.started()`` once the client may rely on the binding (the
    other clients' jobs are replicated, dead clients' jobs adopted).
    """

    @property
    def slots(self) -> SlotLimiter: ...

    @property
    def requests(self) -> RequestLimiter: ...

    @property
    def durations(self) -> DurationStats: ...

    @property
    def store(self) -> JobStore: ...

    async def serve(
        self, member: AccountMember, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None: ...

    def forward(self, task: Task) -> None:
        """A snapshot of a task this client does not follow (a replica's): to its owner."""
        ...

    def stopped(self, error: BaseException) -> None:
        """This client met an account-fatal answer: every other client stops too."""
        ...


@runtime_checkable
class Account(Protocol):
    """What ``KlingClient(account=...)`` takes: state shared by every client of an account."""

    def bind(self, settings: AccountSettings) -> AccountBinding: ...
