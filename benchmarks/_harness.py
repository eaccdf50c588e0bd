"""The emulator in a child process, so the client's CPU and event loop are measured alone.

The parent talks to the child over a pipe: stats, per-task ground truth (created and completed,
in emulated seconds), preloading tasks for scale runs, and stop. Both processes read the same
system-wide monotonic clock, so the parent converts its own observations to emulated time.
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

import anyio
import anyio.to_thread
import attrs

from kling_async.testing import Emulator


@attrs.frozen
class TaskTruth:
    task_id: str
    external_task_id: str | None
    created_at: float
    completes_at: float
    outcome: str


def _child(conn: Connection, settings: dict[str, Any]) -> None:
    async def main() -> None:
        async with Emulator(**settings) as emu:
            origin = time.monotonic() - emu.now() * emu.time_scale
            conn.send(
                {
                    "url": emu.url,
                    "api_key": emu.api_key,
                    "access_key": emu.access_key,
                    "secret_key": emu.secret_key,
                    "origin": origin,
                }
            )
            while True:
                command, argument = await anyio.to_thread.run_sync(conn.recv)
                if command == "stats":
                    stats = emu.stats
                    conn.send(
                        {
                            "requests_per_route": dict(stats.requests_per_route),
                            "tasks_created": stats.tasks_created,
                            "sent_1303": stats.sent_1303,
                            "sent_1302": stats.sent_1302,
                            "peak_active": stats.peak_active,
                            "callbacks_failed": stats.callbacks_failed,
                            "max_per_external_id": max(
                                stats.created_per_external_id.values(), default=0
                            ),
                        }
                    )
                elif command == "tasks":
                    conn.send(
                        [
                            TaskTruth(
                                t.task_id,
                                t.external_task_id,
                                t.created_at,
                                t.completes_at,
                                t.outcome,
                            )
                            for t in emu.tasks.values()
                        ]
                    )
                elif command == "preload":
                    now = emu.now()
                    ids = [
                        emu._store.create(  # a benchmark-only shortcut past HTTP
                            now=now,
                            model_name="kling-v1",
                            mode="std",
                            duration="5",
                            aspect_ratio="16:9",
                            external_task_id=None,
                            callback_url=None,
                            request={},
                        ).task_id
                        for _ in range(argument)
                    ]
                    conn.send(ids)
                else:
                    conn.send(None)
                    return

    anyio.run(main)


class EmulatorProcess:
    """``with EmulatorProcess(time_scale=...) as emu:`` then ``emu.url``, ``emu.stats()``..."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.time_scale: float = settings.get("time_scale", 1.0)
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child, args=(child_conn, settings), daemon=True)

    def __enter__(self) -> EmulatorProcess:
        self._process.start()
        info = self._conn.recv()
        self.url: str = info["url"]
        self.api_key: str = info["api_key"]
        self.access_key: str = info["access_key"]
        self.secret_key: str = info["secret_key"]
        self._origin: float = info["origin"]
        return self

    def __exit__(self, *exc: object) -> None:
        self._ask("stop")
        self._process.join(10)

    def _ask(self, command: str, argument: object = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")  # type: ignore[no-any-return]

    def tasks(self) -> list[TaskTruth]:
        return self._ask("tasks")  # type: ignore[no-any-return]

    def preload(self, n: int) -> list[str]:
        return self._ask("preload", n)  # type: ignore[no-any-return]

    def emulated(self, monotonic: float) -> float:
        """A local ``time.monotonic()`` reading as emulated seconds."""
        return (monotonic - self._origin) / self.time_scale
