"""Task resources: the 1:1 face of the HTTP API (create, get, list, wait, watch).

Kling's video endpoints share one create / get / list shape (text2video, image2video, ...), so
the logic lives in :class:`TaskResource`, bound to a task family
(:class:`~kling_async.protocol.families.TaskFamily`: its path, its request type, the backend
rules a request is checked against, the converter's POST body), and each endpoint is a thin
subclass bound to its family. Only text-to-video exists
today; image-to-video would be an ``Image2VideoResource(TaskResource)`` bound to an
``IMAGE2VIDEO`` family (see :mod:`kling_async.protocol.families`), nothing more here.

Lookups by ``external_task_id`` are undocumented on CometAPI and done three ways by public
clients (protocol 1.1), so :class:`ExternalIdLookups` learns at run time which form the backend
answers, by looking up a task the client knows exists, before a miss is trusted to mean
"never created".
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Literal
from urllib.parse import quote

import anyio
import attrs

from kling_async._errors import (
    IgnoredLookupError,
    InvalidRequestError,
    KlingError,
    TaskFailedError,
    TaskNotFoundError,
    ValidationError,
    WaitTimeoutError,
)
from kling_async.http.caller import Api
from kling_async.http.create import (
    BackendFacts,
    CreateSettings,
    CreateState,
    create_task,
    find_landed,
    new_external_task_id,
)
from kling_async.protocol.converter import (
    Redact,
    answer_fingerprint,
    structure_task,
    structure_task_list,
)
from kling_async.protocol.families import TEXT2VIDEO, TaskFamily
from kling_async.protocol.models import Task, Text2VideoRequest
from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.profiles import BackendProfile, ExternalIdLookup
from kling_async.protocol.schedule import DurationModel

__all__ = ["ExternalIdLookups", "TaskResource", "Text2VideoResource"]

log = logging.getLogger("kling_async")

_FORMS: tuple[ExternalIdLookup, ...] = ("query", "path", "path_flag")
#: After lookups were found not to work, look again after this long, doubling each time up to
#: a minute: a known task may only have been too new to show (a backend's visibility lag).
_RECHECK_FIRST = 1.0
_RECHECK_MAX = 60.0
#: A known task that no form finds proves lookups do not work only once it is this old (or
#: when every form refused the lookup itself): a new task may show in lookups only a while
#: after its create (protocol 7), so until then a miss proves nothing either way.
_SHOWS_WITHIN = 60.0
#: Terminal snapshots kept for ``track()`` (an ended task never changes).
_ENDED_KEPT = 10_000
#: A last look at a wait's deadline may take this long beyond it.
_FINAL_LOOK_GRACE = 5.0


def _check_page(name: str, value: object, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ValidationError(name, value, f"must be a whole number from 1 to {high}")
    return value


def _pick_external(data: Any, external_task_id: str, redact: Redact) -> Task:
    """Accept a task object or an array; adopt only a task that carries our id.

    A server that ignored the lookup parameter and answered with some other task (or a page
    of the list) must never make us adopt the wrong task, nor conclude that ours does not
    exist: only the server's own "not found" answer (:class:`TaskNotFoundError`) means that.
    """
    candidates = (
        structure_task_list(data, redact=redact)
        if isinstance(data, list)
        else [structure_task(data, redact=redact)]
    )
    for task in candidates:
        if task.external_task_id == external_task_id:
            return task
    if len(candidates) == 1 and not isinstance(data, list):
        task = candidates[0]
        if task.external_task_id is None:
            # Older bodies omit task_info; the server looked up what we asked for.
            return attrs.evolve(task, external_task_id=external_task_id)
    what = f"a list of {len(candidates)} tasks" if isinstance(data, list) else "another task"
    raise IgnoredLookupError(
        f"the lookup of external_task_id={external_task_id!r} was answered with {what}: the "
        "backend may not support lookups by external_task_id in this form",
        http_status=200,
    )


class ExternalIdLookups:
    """Finds tasks by ``external_task_id`` in the form the backend answers, learned at run time.

    ``form`` None means never (the caller said the backend cannot). Otherwise the first time a
    miss would matter (:meth:`usable`), a task this client knows exists is looked up by its
    external id: in ``form`` if the caller chose one (``learn=False``), else in each of the
    three forms until one finds it. If none does, lookups count as unsupported (a miss would
    prove nothing), and ambiguous creates are reported instead of re-sent; that verdict is
    checked again after a second, then two, ... up to a minute, since a known task may just
    have been too new to show. A known task under a minute old that no form finds (and that
    some form answered "not found" for, rather than refusing the lookup) proves nothing yet:
    the form is trusted meanwhile, and checked again on the same schedule.
    """

    def __init__(self, api: Api, path: str, form: ExternalIdLookup | None, *, learn: bool) -> None:
        self._api = api
        self._path = path
        self.form = form
        self._learn = learn and form is not None
        self._verdict: Literal["unknown", "works", "broken"] = "unknown"
        self._check_again_at = 0.0
        self._recheck_after = _RECHECK_FIRST
        #: (external_task_id, task_id, monotonic instant it was created) of the first tasks
        #: known to exist, oldest first.
        self._known: deque[tuple[str, str, float]] = deque()

    @property
    def configured(self) -> bool:
        return self.form is not None

    def remember(self, task: Task) -> None:
        """A task known to exist, with its external id: material for the check."""
        if self._verdict != "works" and task.external_task_id and len(self._known) < 4:
            # The oldest are kept: the longer a task has existed, the surer it shows.
            pair = (task.external_task_id, task.task_id)
            if all(known[:2] != pair for known in self._known):
                created = task.created_at
                age = 0.0 if created is None else max(0.0, time.time() - created.timestamp())
                self._known.append((*pair, time.monotonic() - age))

    async def usable(self) -> bool:
        if self.form is None:
            return False
        if self._verdict == "works":
            return True
        if time.monotonic() < self._check_again_at:
            return self._verdict != "broken"
        if not self._known:
            return True  # nothing to check against: trust the configured form
        return await self._check()

    async def _check(self) -> bool:
        external_task_id, task_id, created = self._known[0]
        assert self.form is not None
        forms = [self.form, *(f for f in _FORMS if f != self.form)] if self._learn else [self.form]
        refused = True  # every form refused the lookup itself (rather than finding nothing)
        for form in forms:
            try:
                task = await self._find(external_task_id, form, offered=True)
            except TaskNotFoundError:
                refused = False
                continue
            except (InvalidRequestError, IgnoredLookupError):
                continue
            except KlingError:
                return True  # the server is failing: inconclusive, keep the form
            if task.task_id != task_id:
                continue
            if form != self.form:
                log.info("lookups by external_task_id work here in the %r form", form)
            self.form, self._verdict = form, "works"
            self._known.clear()
            return True
        now = time.monotonic()
        self._check_again_at = now + self._recheck_after
        self._recheck_after = min(self._recheck_after * 2, _RECHECK_MAX)
        if not refused and now - created < _SHOWS_WITHIN:
            # Not found, but it may just not show yet: trust the form until it is older.
            self._verdict = "unknown"
            return True
        first = self._verdict != "broken"
        self._verdict = "broken"
        if not first:
            return False
        log.warning(
            "lookups by external_task_id do not find a known task on this backend (tried "
            "%s): an ambiguous create will be reported, not sent again",
            ", ".join(forms),
        )
        return False

    async def find(self, external_task_id: str, *, offered: bool = True) -> Task:
        """The task with this external id, or :class:`TaskNotFoundError`."""
        return await self._find(external_task_id, self.form or "query", offered=offered)

    async def _find(self, external_task_id: str, form: ExternalIdLookup, *, offered: bool) -> Task:
        quoted = quote(external_task_id, safe="")
        read = self._api.read
        if form == "query":
            params = {"external_task_id": external_task_id}
            data = await read(self._path, params=params, query=True, offered=offered)
        elif form == "path":
            data = await read(f"{self._path}/{quoted}", query=True, offered=offered)
        else:
            data = await read(
                f"{self._path}/{quoted}",
                params={"external_task_id": "true"},
                query=True,
                offered=offered,
            )
        return _pick_external(data, external_task_id, self._api.redact)


class TaskResource:
    """create / get / list / wait / watch for one family of video tasks (``family``)."""

    def __init__(
        self,
        api: Api,
        family: TaskFamily[Any],
        *,
        profile: BackendProfile,
        create_settings: CreateSettings,
        poll: PollPolicy,
        external_id_lookup: ExternalIdLookup | None,
        learn_lookup: bool = True,
        callback_url: str | None = None,
    ) -> None:
        self._api = api
        #: Sent with every create whose request names none (push delivery). Added to the body
        #: only, so a request (as kept by a job store) never holds it: it carries a secret.
        self._callback_url = callback_url
        self.family = family
        self._path = path = family.path
        self._profile = profile
        self._create_settings = create_settings
        self._poll = poll
        self.lookups = ExternalIdLookups(api, path, external_id_lookup, learn=learn_lookup)
        self.facts = BackendFacts(profile.repeated_external_id)
        self._rng = random.Random()
        self._models: dict[PollPolicy, DurationModel] = {}
        #: The terminal snapshot of each task seen ending through :meth:`get` (the latest
        #: ``_ENDED_KEPT``): an ended task never changes, so a job tracking one later (a
        #: ``wait()`` then a ``track()``) can be finished at once, with no request.
        self._ended: OrderedDict[str, Task] = OrderedDict()

    def prepare(self, request: Any) -> Any:
        """Check ``request`` against the backend profile and give it an ``external_task_id``.

        Everything that can be wrong with a request fails here, before any network call.
        """
        family = self.family
        if not isinstance(request, family.request_type):
            raise ValidationError(
                "request", request, f"must be a {family.request_type.__name__} ({family.name})"
            )
        family.validate(self._profile, request)
        if request.external_task_id is None:
            request = attrs.evolve(request, external_task_id=new_external_task_id())
        return request

    @property
    def can_look_up(self) -> bool:
        """Whether tasks may be found by ``external_task_id`` here (ambiguity is resolvable)."""
        return self.lookups.configured

    async def create_prepared(
        self,
        request: Any,
        settings: CreateSettings,
        state: CreateState | None = None,
    ) -> Task:
        """Create the task for a request that went through :meth:`prepare`.

        ``state`` carries what is known of earlier creates of this job (see ``_create``).
        """
        external_task_id = request.external_task_id
        assert external_task_id is not None
        if state is None:
            state = CreateState(external_task_id)
        body = self.family.body(request)
        if self._callback_url is not None and "callback_url" not in body:
            body = {**body, "callback_url": self._callback_url}
        task = await create_task(
            self._api,
            self._path,
            body,
            state=state,
            lookups=self.lookups if self.lookups.configured else None,
            settings=settings,
            facts=self.facts,
        )
        self.lookups.remember(task)
        return task

    async def find_landed(self, state: CreateState) -> Task:
        """The task of a create the server said exists, once lookups show it (see ``_create``)."""
        lookups = self.lookups if self.lookups.configured else None
        task = await find_landed(self._api, lookups, state, self._create_settings.retry)
        self.lookups.remember(task)
        return task

    def ended(self, task_id: str) -> Task | None:
        """The terminal snapshot of ``task_id`` if this resource has seen it end, else None."""
        return self._ended.get(task_id)

    def _note_ended(self, task: Task) -> None:
        self._ended[task.task_id] = task
        self._ended.move_to_end(task.task_id)
        if len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)

    async def get(self, task_id: str | None = None, *, external_task_id: str | None = None) -> Task:
        """The task's current snapshot, by ``task_id`` or by your ``external_task_id``.

        Raises :class:`TaskNotFoundError` when the account has no such task.
        """
        if (task_id is None) == (external_task_id is None):
            raise ValidationError(
                "task_id", task_id, "give exactly one of task_id or external_task_id"
            )
        if task_id is not None:
            if not isinstance(task_id, str) or not task_id:
                raise ValidationError("task_id", task_id, "must be a non-empty string")
            data = await self._api.read(f"{self._path}/{quote(task_id, safe='')}", query=True)
            task = structure_task(data, redact=self._api.redact)
            self.lookups.remember(task)
            if task.is_terminal:
                self._note_ended(task)
            return task
        assert external_task_id is not None
        if not isinstance(external_task_id, str) or not external_task_id:
            raise ValidationError(
                "external_task_id", external_task_id, "must be a non-empty string"
            )
        return await self.lookups.find(external_task_id)

    async def poll(
        self, task_id: str, known: int | None = None, last: Task | None = None
    ) -> tuple[Task, int | None]:
        """:meth:`get` by ``task_id``, for the poller pool: also returns the answer's
        fingerprint (:func:`~kling_async.protocol.converter.answer_fingerprint`). Given the
        last answer's (``known``) and the task it gave (``last``), an answer unchanged since
        (the same bytes, but for its request id) gives ``last`` again, the same object, with
        no parsing and no structuring: most polls of a running task see nothing new.

        The task's id is the caller's ``task_id`` string, not a copy from the answer, so a
        followed task holds its id once.
        """
        fingerprint: int | None = None

        def unchanged(status: int, body: bytes) -> Task | None:
            nonlocal fingerprint  # the last answer's: the one ``read`` returns (or raises)
            fingerprint = answer_fingerprint(body) if status == 200 else None
            if last is not None and known is not None and fingerprint == known:
                return last
            return None

        path = f"{self._path}/{quote(task_id, safe='')}"
        data = await self._api.read(path, query=True, shortcut=unchanged)
        if last is not None and data is last:
            return last, fingerprint
        if type(data) is dict and data.get("task_id") == task_id:
            data["task_id"] = task_id
        task = structure_task(data, redact=self._api.redact)
        self.lookups.remember(task)
        if task.is_terminal:
            self._note_ended(task)
        return task, fingerprint

    async def list_page(
        self,
        page: int,
        page_size: int,
        *,
        known: int | None = None,
        last: list[Task] | None = None,
        held: Callable[[str], str | None] | None = None,
    ) -> tuple[list[Task], int | None]:
        """:meth:`list` for the poller pool's sweeps, with :meth:`poll`'s memory: a page
        unchanged since ``known`` (its last fingerprint) gives ``last`` (the tasks it gave),
        and a page that changed is parsed and structured. ``held`` maps a task id the
        client holds already to that string (None for any other), so that a swept task
        keeps one copy of its id."""
        _check_page("page", page, 1000)
        _check_page("page_size", page_size, 500)
        fingerprint: int | None = None

        def unchanged(status: int, body: bytes) -> list[Task] | None:
            nonlocal fingerprint
            fingerprint = answer_fingerprint(body) if status == 200 else None
            if last is not None and known is not None and fingerprint == known:
                return last
            return None

        data = await self._api.read(
            self._path,
            params={"pageNum": str(page), "pageSize": str(page_size)},
            shortcut=unchanged,
        )
        if last is not None and data is last:
            return last, fingerprint
        if held is not None and type(data) is list:
            for item in data:
                if type(item) is dict and type(task_id := item.get("task_id")) is str:
                    mine = held(task_id)
                    if mine is not None:
                        item["task_id"] = mine
        return structure_task_list(data, redact=self._api.redact), fingerprint

    async def list(self, *, page: int = 1, page_size: int = 30) -> list[Task]:
        """One page of the account's tasks, newest first (the official API; 1..1000, 1..500)."""
        _check_page("page", page, 1000)
        _check_page("page_size", page_size, 500)
        data = await self._api.read(
            self._path, params={"pageNum": str(page), "pageSize": str(page_size)}
        )
        return structure_task_list(data, redact=self._api.redact)

    async def watch(
        self, task_id: str, *, poll: PollPolicy | None = None
    ) -> AsyncGenerator[Task, None]:
        """Yield a snapshot each time the task's status changes; stop after the terminal one."""
        async with aclosing(self._follow(task_id, poll or self._poll, None)) as snapshots:
            async for snapshot in snapshots:
                yield snapshot

    async def _follow(
        self, task_id: str, policy: PollPolicy, deadline: float | None
    ) -> AsyncGenerator[Task, None]:
        """:meth:`watch`, ending at ``deadline`` (monotonic) too, with one look at it.

        The schedule is the same inspection schedule the poller pool uses, from the policy's
        prior (one task alone teaches nothing); computed once per policy. No sleep runs past
        the deadline, so a task that ended before it is seen whatever the schedule.
        """
        model = self._models.get(policy)
        if model is None:
            model = self._models[policy] = policy.duration_model()
        started = time.monotonic()
        last_status = None
        while True:
            task = await self.get(task_id)
            if task.status is not last_status:
                last_status = task.status
                yield task
            if task.is_terminal:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            age = now - started
            delay = policy.jittered(model.next_age(age) - age, self._rng)
            if deadline is not None:
                delay = min(delay, deadline - now)
            await anyio.sleep(delay)

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the wait's budget is public API)
        poll: PollPolicy | None = None,
    ) -> Task:
        """The task once it ends. Raises :class:`TaskFailedError` if it failed and
        :class:`WaitTimeoutError` (a ``TimeoutError``) if ``timeout`` seconds pass first.

        The task is looked at once more at the deadline, so one that ended before it is
        returned whatever the poll schedule; that last look may take a few seconds more.
        """
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout >= 0
        ):
            raise ValidationError("timeout", timeout, "must be a number of seconds >= 0, or None")
        deadline = None if timeout is None else time.monotonic() + timeout
        limit = None if timeout is None else timeout + _FINAL_LOOK_GRACE
        last: Task | None = None
        with anyio.move_on_after(limit):
            async with aclosing(self._follow(task_id, poll or self._poll, deadline)) as snapshots:
                async for snapshot in snapshots:
                    last = snapshot
        if last is None or not last.is_terminal:
            raise WaitTimeoutError(task_id, timeout if timeout is not None else 0.0, last)
        if last.failed:
            raise TaskFailedError(last)
        return last


class Text2VideoResource(TaskResource):
    """``client.text2video``: text-to-video tasks, the resource bound to ``TEXT2VIDEO``.

    ``path`` is accepted for callers that still pass it; it must be the family's.
    """

    def __init__(self, api: Api, path: str = TEXT2VIDEO.path, /, **settings: Any) -> None:
        if path != TEXT2VIDEO.path:
            raise ValidationError("path", path, f"text2video lives at {TEXT2VIDEO.path}")
        super().__init__(api, TEXT2VIDEO, **settings)

    async def create(self, request: Text2VideoRequest) -> Task:
        """Create one task and return its first snapshot (usually ``submitted``).

        Validates against the backend profile first, gives the request an
        ``external_task_id`` if it has none, and never creates two tasks for one call.
        """
        return await self.create_prepared(self.prepare(request), self._create_settings)
