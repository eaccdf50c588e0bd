"""Task families: what differs between Kling's task endpoints, as one frozen value each.

Kling's video endpoints share one shape (create by POST, query one by id or external id, list a
page), so the HTTP layer's :class:`~kling_async.http.resources.TaskResource` is written once and
bound to a family: the path, the request class, the backend rules a request is checked against,
and the converter's function for its POST body. Only text-to-video is in scope today.

Image-to-video goes beside it in three steps, none of which touches the engine: an
``Image2VideoRequest`` model in :mod:`.models` (with its wire body in :mod:`.converter`), an
``IMAGE2VIDEO = TaskFamily(name="image2video", path="/v1/videos/image2video", ...)`` constant
here, and an ``Image2VideoResource`` subclass bound to it in :mod:`kling_async.http.resources`.
Tasks themselves decode the same way in every family (one :class:`Task`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

from kling_async.protocol.converter import request_body
from kling_async.protocol.models import Text2VideoRequest
from kling_async.protocol.profiles import BackendProfile

__all__ = ["TEXT2VIDEO", "TaskFamily"]

RequestT = TypeVar("RequestT")


@attrs.frozen(kw_only=True)
class TaskFamily(Generic[RequestT]):
    """One task endpoint: ``path`` is appended to the base URL (``/v1/videos/text2video``).

    ``request_type`` is what the resource accepts (anything else is refused by name);
    ``validate(profile, request)`` raises :class:`ValidationError` for the first rule of that
    backend the request breaks (before any network call), and warns as the profile does;
    ``body(request)`` is the create POST's JSON body, built by the one converter.
    """

    name: str
    path: str
    request_type: type[RequestT]
    validate: Callable[[BackendProfile, RequestT], None] = attrs.field(repr=False)
    body: Callable[[RequestT], dict[str, Any]] = attrs.field(repr=False)


TEXT2VIDEO: TaskFamily[Text2VideoRequest] = TaskFamily(
    name="text2video",
    path="/v1/videos/text2video",
    request_type=Text2VideoRequest,
    validate=BackendProfile.validate,
    body=request_body,
)
