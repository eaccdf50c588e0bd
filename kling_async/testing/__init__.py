"""A local Kling text-to-video server for testing code that uses the API, with no account.

``async with Emulator(time_scale=0.001) as emu:`` serves the protocol on ``emu.url`` (loopback
only): both path families, both auth modes, the task lifecycle on a scaled clock, concurrency
and rate limits, callbacks, playable files from a separate (optionally https) origin, seeded
faults, and optionally a state file that survives restarts. ``emu.stats`` is the ground
truth (tasks created per ``external_task_id``, requests per route, peak active tasks, ...).
:func:`main` is the command line (``python -m kling_async.testing``, ``kling-async emulator``).
"""

from ._cli import main
from ._emulator import Emulator
from ._faults import FaultKind, Faults
from ._persist import StateFileError
from ._state import EmulatedTask, EmulatedVideo, EmulatorStats

__all__ = [
    "EmulatedTask",
    "EmulatedVideo",
    "Emulator",
    "EmulatorStats",
    "FaultKind",
    "Faults",
    "StateFileError",
    "main",
]
