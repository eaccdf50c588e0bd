"""The engine's record of one job (:class:`Entry`), laid out for 100,000 of them.

The tracker keeps one entry per job for the client's whole life (ended jobs still answer), and
the poller pool reads and writes a few of its fields on every poll. So the entry is kept small:
its yes/no fields are bits of one small int, the fields that only hints (callbacks) and failing
polls use live in a side record made on their first write, and it has no ``__dict__`` and no
weak-reference slot. Every field reads and writes as a plain attribute all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

from kling_async.protocol.schedule import ClassKey

if TYPE_CHECKING:
    from kling_async.engine.jobs import Job
    from kling_async.protocol.models import Task

__all__ = ["Entry", "HeapItem"]

T = TypeVar("T")


class HeapItem(Protocol):
    """What the poller pool's heap orders: an :class:`Entry`, or a poll brought forward."""

    heap_key: float | None


class _Flag:
    """A yes/no field of an :class:`Entry`: one bit of its ``_flags``."""

    __slots__ = ("bit",)

    def __init__(self, bit: int) -> None:
        self.bit = bit

    @overload
    def __get__(self, entry: None, owner: type[Entry]) -> _Flag: ...
    @overload
    def __get__(self, entry: Entry, owner: type[Entry]) -> bool: ...
    def __get__(self, entry: Entry | None, owner: type[Entry]) -> bool | _Flag:
        if entry is None:
            return self
        return entry._flags & self.bit != 0

    def __set__(self, entry: Entry, value: bool) -> None:
        if value:
            entry._flags |= self.bit
        else:
            entry._flags &= ~self.bit


class _Seldom:
    """What only hints and failing polls use: most entries never have one."""

    __slots__ = (
        "confirmed_at",
        "end_hint_age",
        "failing_since",
        "failures",
        "hinted_at",
        "not_before",
        "not_found",
    )

    def __init__(self) -> None:
        for name, default in _SELDOM_DEFAULTS.items():
            setattr(self, name, default)


_SELDOM_DEFAULTS: dict[str, Any] = {
    "hinted_at": None,
    "confirmed_at": -1e18,
    "not_before": 0.0,
    "end_hint_age": None,
    "not_found": 0,
    "failures": 0,
    "failing_since": None,
}


class _SeldomField(Generic[T]):
    """A field of an entry's side record: its default while there is none (writing the
    default makes none)."""

    __slots__ = ("default", "name")

    def __init__(self) -> None:
        self.name = ""
        self.default: T

    def __set_name__(self, owner: type[Entry], name: str) -> None:
        self.name = name
        self.default = _SELDOM_DEFAULTS[name]

    @overload
    def __get__(self, entry: None, owner: type[Entry]) -> _SeldomField[T]: ...
    @overload
    def __get__(self, entry: Entry, owner: type[Entry]) -> T: ...
    def __get__(self, entry: Entry | None, owner: type[Entry]) -> T | _SeldomField[T]:
        if entry is None:
            return self
        seldom = entry._seldom
        if seldom is None:
            return self.default
        value: T = getattr(seldom, self.name)
        return value

    def __set__(self, entry: Entry, value: T) -> None:
        seldom = entry._seldom
        if seldom is None:
            if value == self.default:
                return
            seldom = entry._seldom = _Seldom()
        setattr(seldom, self.name, value)


class Entry:
    """The engine's record of one job (see the tracker's module docstring). Times are
    monotonic."""

    __slots__ = (
        "_flags",
        "_seldom",
        "answer",
        "answer_hash",
        "class_key",
        "due",
        "heap_key",
        "job",
        "poll_token",
        "polled_at",
        "started_at",
        "swept",
    )

    #: The job holds one of the account's slots (from take_slot/track until its end).
    holds_slot = _Flag(1)
    #: A create for it may have gone out (in this run or, for a loaded job, an earlier one).
    sent = _Flag(2)
    #: The job store holds the "sent" mark of this client's first create of the job.
    marked = _Flag(4)
    #: Whether ``started_at`` is our own submission time (only then is its duration a
    #: measurement the statistics may learn from).
    measured = _Flag(8)
    #: Its next poll must not be put off (it confirms a hint, or follows a task just tracked).
    pinned = _Flag(16)
    #: A callback claimed an end that no poll started since has looked at.
    unconfirmed = _Flag(32)
    #: Its task was created here with the client's callback URL (callbacks may come for it).
    pushed = _Flag(64)
    #: Another client of a shared account owns the job: this one keeps its state as it is
    #: told (``replicate``), never polls it, never writes it, never ends it.
    replica = _Flag(128)
    # (Eight flags at most: ``_flags`` stays a small int, which CPython shares.)

    #: When an outside hint (a callback) last came for its task: while hints come, the
    #: pollers keep only a safety-net poll for it.
    hinted_at: _SeldomField[float | None] = _SeldomField()
    #: When a hint last brought a poll forward.
    confirmed_at: _SeldomField[float] = _SeldomField()
    #: No poll before this (a back-off: not found yet, failing polls).
    not_before: _SeldomField[float] = _SeldomField()
    #: The age at which a callback first claimed the task's end since the last poll that
    #: showed it running: once a poll confirms the end, a better measurement of its duration
    #: than the midpoint since that poll (under push delivery, the create).
    end_hint_age: _SeldomField[float | None] = _SeldomField()
    #: Poll rounds in a row that said "not found", or that failed, and since when.
    not_found: _SeldomField[int] = _SeldomField()
    failures: _SeldomField[int] = _SeldomField()
    failing_since: _SeldomField[float | None] = _SeldomField()

    def __init__(
        self,
        job: Job,
        class_key: ClassKey = ("", "", ""),
        *,
        sent: bool = False,
        replica: bool = False,
    ) -> None:
        self.job = job
        self.class_key = class_key
        self._flags = 0
        self._seldom: _Seldom | None = None
        self.sent = sent
        self.replica = replica
        #: When its task started, as far as we know (see ``measured``).
        self.started_at = 0.0
        #: When its task was last seen (a poll or a sweep; None before): a sweep's page
        #: shares one such instant among its 500 tasks, where ages would be 500 floats.
        self.polled_at: float | None = None
        #: The schedule: the token of its latest schedule, and when that poll is due.
        self.poll_token = 0
        self.due = 0.0
        #: The instant it is filed under in the pool's heap, None while it is not in it (it
        #: is there at most once; see the pool's class comment).
        self.heap_key: float | None = None
        #: The number of the last list sweep that saw its task (see the poller pool).
        self.swept = 0
        #: The last poll's answer: its fingerprint and the task it gave, reused while the
        #: answer stays the same (see ``TaskResource.poll``).
        self.answer_hash: int | None = None
        self.answer: Task | None = None

    def __repr__(self) -> str:
        return f"Entry(job={self.job!r}, due={self.due!r}, poll_token={self.poll_token!r})"

    def __lt__(self, other: HeapItem) -> bool:
        # The entry is its own item in the pool's heap (no tuple per schedule), and every
        # item there has a key.
        return self.heap_key < other.heap_key  # type: ignore[operator]

    @property
    def poll_age(self) -> float:
        """The task's age at its last poll (0.0 before any)."""
        polled = self.polled_at
        return 0.0 if polled is None else polled - self.started_at

    @poll_age.setter
    def poll_age(self, age: float) -> None:
        self.polled_at = self.started_at + age

    def clear_failures(self) -> None:
        """A poll was answered: the rounds of "not found" and of failures start again."""
        if self._seldom is not None:
            self.not_found = self.failures = 0
            self.failing_since = None
