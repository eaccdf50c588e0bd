"""Task resources: the 1:1 face of the HTTP API (create, get, list, wait, watch).

Kling's video endpoints share one create / get / list shape (text2video, image2video, ...), so
the logic lives in :class:`TaskResource` keyed by its path, and each endpoint is a thin subclass
that knows its request type. Only text-to-video exists today.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import anyio
import attrs

from ._api import Api
from ._create import CreateSettings, create_task, new_external_task_id
from ._errors import (
    TaskFailedError,
    TaskNotFoundError,
    ValidationError,
    WaitTimeoutError,
)
from ._models import Task, Text2VideoRequest
from ._poll import PollPolicy
from ._profiles import BackendProfile, ExternalIdLookup
from ._schedule import DurationModel
from ._wire import request_body, structure_task, structure_task_list

__all__ = ["TaskResource", "Text2VideoResource"]


def _check_page(name: str, value: object, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ValidationError(name, value, f"must be a whole number from 1 to {high}")
    return value


class TaskResource:
    """create / get / list / wait / watch for one family of video tasks."""

    def __init__(
        self,
        api: Api,
        path: str,
        *,
        profile: BackendProfile,
        create_settings: CreateSettings,
        poll: PollPolicy,
        external_id_lookup: ExternalIdLookup | None,
    ) -> None:
        self._api = api
        self._path = path
        self._profile = profile
        self._create_settings = create_settings
        self._poll = poll
        self._lookup_form = external_id_lookup
        self._rng = random.Random()
        self._models: dict[PollPolicy, DurationModel] = {}

    def prepare(self, request: Text2VideoRequest) -> Text2VideoRequest:
        """Check ``request`` against the backend profile and give it an ``external_task_id``.

        Everything that can be wrong with a request fails here, before any network call.
        """
        if not isinstance(request, Text2VideoRequest):
            raise ValidationError("request", request, "must be a Text2VideoRequest")
        self._profile.validate(request)
        if request.external_task_id is None:
            request = attrs.evolve(request, external_task_id=new_external_task_id())
        return request

    @property
    def can_look_up(self) -> bool:
        """Whether tasks can be found by ``external_task_id`` here (ambiguity is resolvable)."""
        return self._lookup_form is not None

    async def create_prepared(
        self,
        request: Text2VideoRequest,
        settings: CreateSettings,
        *,
        earlier_ambiguity: BaseException | None = None,
    ) -> Task:
        """Create the task for a request that went through :meth:`prepare`."""
        external_task_id = request.external_task_id
        assert external_task_id is not None
        return await create_task(
            self._api,
            self._path,
            request_body(request),
            external_task_id=external_task_id,
            lookup=self._find_external if self._lookup_form is not None else None,
            settings=settings,
            earlier_ambiguity=earlier_ambiguity,
        )

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
            return structure_task(data)
        assert external_task_id is not None
        if not isinstance(external_task_id, str) or not external_task_id:
            raise ValidationError(
                "external_task_id", external_task_id, "must be a non-empty string"
            )
        return await self._find_external(external_task_id)

    async def _find_external(self, external_task_id: str) -> Task:
        form = self._lookup_form or "query"
        quoted = quote(external_task_id, safe="")
        if form == "query":
            data = await self._api.read(
                self._path, params={"external_task_id": external_task_id}, query=True
            )
        elif form == "path":
            data = await self._api.read(f"{self._path}/{quoted}", query=True)
        else:
            data = await self._api.read(
                f"{self._path}/{quoted}", params={"external_task_id": "true"}, query=True
            )
        return self._pick_external(data, external_task_id)

    @staticmethod
    def _pick_external(data: Any, external_task_id: str) -> Task:
        """Accept a task object or an array; adopt only a task that carries our id.

        A server that ignored the lookup parameter and answered with some other task (or a
        page of the list) must never make us adopt the wrong task.
        """
        candidates = structure_task_list(data) if isinstance(data, list) else [structure_task(data)]
        for task in candidates:
            if task.external_task_id == external_task_id:
                return task
        if len(candidates) == 1 and not isinstance(data, list):
            task = candidates[0]
            if task.external_task_id is None:
                # Older bodies omit task_info; the server looked up what we asked for.
                return attrs.evolve(task, external_task_id=external_task_id)
        raise TaskNotFoundError(
            f"no task with external_task_id={external_task_id!r}",
            code=None,
            http_status=200,
        )

    async def list(self, *, page: int = 1, page_size: int = 30) -> list[Task]:
        """One page of the account's tasks, newest first (the official API; 1..1000, 1..500)."""
        _check_page("page", page, 1000)
        _check_page("page_size", page_size, 500)
        data = await self._api.read(
            self._path, params={"pageNum": str(page), "pageSize": str(page_size)}
        )
        return structure_task_list(data)

    async def watch(
        self, task_id: str, *, poll: PollPolicy | None = None
    ) -> AsyncGenerator[Task, None]:
        """Yield a snapshot each time the task's status changes; stop after the terminal one."""
        policy = poll or self._poll
        # The same inspection schedule the poller pool uses, from the policy's prior (one task
        # alone teaches nothing); computed once per policy.
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
            age = time.monotonic() - started
            delay = model.next_age(age) - age
            await anyio.sleep(policy.jittered(delay, self._rng))

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the wait's budget is public API)
        poll: PollPolicy | None = None,
    ) -> Task:
        """The task once it ends. Raises :class:`TaskFailedError` if it failed and
        :class:`WaitTimeoutError` (a ``TimeoutError``) if ``timeout`` seconds pass first.
        """
        last: Task | None = None
        with anyio.move_on_after(timeout) as scope:
            async with aclosing(self.watch(task_id, poll=poll)) as snapshots:
                async for snapshot in snapshots:
                    last = snapshot
        if scope.cancelled_caught or last is None or not last.is_terminal:
            raise WaitTimeoutError(task_id, timeout if timeout is not None else 0.0, last)
        if last.failed:
            raise TaskFailedError(last)
        return last


class Text2VideoResource(TaskResource):
    """``client.text2video``: text-to-video tasks."""

    async def create(self, request: Text2VideoRequest) -> Task:
        """Create one task and return its first snapshot (usually ``submitted``).

        Validates against the backend profile first, gives the request an
        ``external_task_id`` if it has none, and never creates two tasks for one call.
        """
        return await self.create_prepared(self.prepare(request), self._create_settings)
