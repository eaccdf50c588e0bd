"""The control endpoints: the emulator's ground truth and knobs over HTTP, under ``/_emulator``.

A test that runs the emulator in another process (so that it can ``kill -9`` a client and
rerun it while the server keeps its state) cannot read ``emu.stats`` or call ``emu.set_faults``.
These routes give it the same powers. They are served only when asked for
(``Emulator(admin=True)``, ``--admin`` on the command line) and, like everything the emulator
serves, only on loopback. They are no part of Kling's API and never counted in the stats.

- ``GET /_emulator/stats``: :class:`EmulatorStats` as JSON.
- ``GET /_emulator/tasks``: every task with its external id, status now, and each video's id
  and SHA-256 (what a download must hash to).
- ``POST /_emulator/faults``: ``{"create": {"DROP_AFTER_COMMIT": 0.5}, "query": {...},
  "download": {...}, "stall_seconds": 5}`` replaces the fault rates; ``{}`` or ``null`` clears.
- ``POST /_emulator/settings``: any of ``failure_rate``, ``median_duration`` (for tasks created
  from now on), ``concurrency_limit``, ``account_error`` (a code or null), ``download_rate``
  (bytes per second or null), ``url_ttl`` (emulated seconds or null), ``visibility_lag``
  (emulated seconds, for tasks created from now on), ``duplicate_external_id`` (``"reject"``,
  ``"return_first"`` or ``"allow"``), ``result_url`` (a template with ``{video_id}`` and
  ``{files}``, or null). Answers the settings; ``GET`` answers them too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
from aiohttp import web

from ._faults import FaultKind, Faults
from ._server import check_duplicate_policy, check_visibility_lag
from ._video import check_result_url
from ._wire import dumps

if TYPE_CHECKING:
    from ._emulator import Emulator

PREFIX: Final = "/_emulator"


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(status=status, text=dumps(payload), content_type="application/json")


def _bad(message: str) -> web.Response:
    return _json({"error": message}, status=400)


def _rates(channel: str, value: object) -> dict[FaultKind, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{channel} must be an object of fault kind name -> rate")
    rates: dict[FaultKind, float] = {}
    for name, rate in value.items():
        try:
            kind = FaultKind[str(name)]
        except KeyError:
            known = ", ".join(kind.name for kind in FaultKind)
            raise ValueError(f"{channel}: unknown fault kind {name!r} (known: {known})") from None
        if not isinstance(rate, int | float) or isinstance(rate, bool):
            raise TypeError(f"{channel}[{name}] must be a number, got {rate!r}")
        rates[kind] = float(rate)
    return rates


def faults_from_json(body: object) -> Faults | None:
    """The :class:`Faults` a ``POST /_emulator/faults`` body describes (None: no faults)."""
    if body is None or body == {}:
        return None
    if not isinstance(body, Mapping):
        raise TypeError("the body must be a JSON object or null")
    unknown = set(body) - {"create", "query", "download", "stall_seconds"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    stall = body.get("stall_seconds", 30.0)
    if not isinstance(stall, int | float) or isinstance(stall, bool):
        raise TypeError(f"stall_seconds must be a number, got {stall!r}")
    return Faults(
        create=_rates("create", body.get("create")),
        query=_rates("query", body.get("query")),
        download=_rates("download", body.get("download")),
        stall_seconds=float(stall),
    )


def stats_json(emulator: Emulator) -> dict[str, Any]:
    # Counters are dicts; json turns their int keys (error codes) into strings.
    return attrs.asdict(emulator.stats)


def tasks_json(emulator: Emulator) -> list[dict[str, Any]]:
    now = emulator.now()
    return [
        {
            "task_id": task.task_id,
            "external_task_id": task.external_task_id,
            "status": task.status_at(now),
            "videos": [
                {"id": video.id, "sha256": emulator.video_sha256(video.id)} for video in task.videos
            ],
        }
        for task in emulator.tasks.values()
    ]


def _number_or_none(name: str, value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or null, got {value!r}")
    return float(value)


def _int_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number or null, got {value!r}")
    return value


def apply_settings(emulator: Emulator, body: object) -> None:
    """Apply a ``POST /_emulator/settings`` body, or raise TypeError / ValueError: every value
    is checked before any is set, since a half-applied change is worse than a clear refusal."""
    if not isinstance(body, Mapping):
        raise TypeError("the body must be a JSON object")
    changes: list[Callable[[], None]] = []
    for key, value in body.items():
        if key in ("failure_rate", "median_duration"):
            number = _number_or_none(key, value)
            if number is None:
                raise ValueError(f"{key} must be a number")
            changes.append(partial(emulator.set_lifecycle, **{key: number}))
        elif key == "concurrency_limit":
            changes.append(partial(emulator.set_concurrency_limit, _int_or_none(key, value)))
        elif key == "account_error":
            changes.append(partial(emulator.force_account_error, _int_or_none(key, value)))
        elif key == "download_rate":
            changes.append(partial(emulator.set_download_rate, _number_or_none(key, value)))
        elif key == "url_ttl":
            changes.append(partial(emulator.set_url_ttl, _number_or_none(key, value)))
        elif key == "visibility_lag":
            changes.append(partial(emulator.set_visibility_lag, check_visibility_lag(value)))
        elif key == "duplicate_external_id":
            changes.append(partial(emulator.set_duplicate_policy, check_duplicate_policy(value)))
        elif key == "result_url":
            changes.append(partial(emulator.set_result_url, check_result_url(value)))
        else:
            raise ValueError(f"unknown setting {key!r}")
    for change in changes:
        change()


def settings_json(emulator: Emulator) -> dict[str, Any]:
    return emulator.settings_snapshot()


async def _read_json(request: web.Request) -> object:
    raw = await request.read()
    if not raw.strip():
        return None
    return json.loads(raw)


def add_admin_routes(app: web.Application, emulator: Emulator) -> None:
    """Serve the control endpoints on ``app`` (before it starts)."""

    async def stats(_request: web.Request) -> web.Response:
        return _json(stats_json(emulator))

    async def tasks(_request: web.Request) -> web.Response:
        return _json(tasks_json(emulator))

    async def faults(request: web.Request) -> web.Response:
        try:
            emulator.set_faults(faults_from_json(await _read_json(request)))
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json({"ok": True})

    async def settings(request: web.Request) -> web.Response:
        try:
            apply_settings(emulator, await _read_json(request))
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json(settings_json(emulator))

    async def current_settings(_request: web.Request) -> web.Response:
        return _json(settings_json(emulator))

    app.router.add_get(f"{PREFIX}/stats", stats)
    app.router.add_get(f"{PREFIX}/tasks", tasks)
    app.router.add_post(f"{PREFIX}/faults", faults)
    app.router.add_get(f"{PREFIX}/settings", current_settings)
    app.router.add_post(f"{PREFIX}/settings", settings)
