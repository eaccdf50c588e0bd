"""Keeping the cyclic garbage collector's full passes off the event loop's worst case.

A client that follows 100,000 jobs holds half a million long-lived objects (jobs, their
engine records, snapshots, schedule items), and CPython's collector walks every one of them on
each full pass: about 160 ms with nothing else running, every time the objects grew by a
quarter, so while the jobs come in the loop stalls again and again, for longer each time.
Those objects live as long as the client does, so walking them finds nothing.

:class:`Collector` moves them out of the collector's way with :func:`gc.freeze` once
``FREEZE_EVERY`` jobs have been registered since the last freeze: at the next turn of the loop
(after the burst that made them), the young generations are collected first (cheap: they are
small), so that the garbage just made is freed rather than frozen, then everything the
collector tracks goes to its permanent generation. Later full passes walk only what was made
since, and freezing costs no pause of its own.

The collector is process-wide, and so is this, which is why it is done only by a client that
has so many jobs, and undone: when a client that froze closes, :func:`gc.unfreeze` puts
everything back in the oldest generation, where its objects (which refer to each other: the
collector, not reference counts, frees them) are freed by the next full pass; a client still
open freezes its own again after its next burst of jobs, with one full pass first, so a
closed client's objects are never frozen again.
Two consequences for an application: garbage that was already old at a freeze (it would
have waited for a full pass anyway) waits until then too, and an application that freezes
for its own reasons (before forking workers) sees its objects unfrozen when such a client
closes. A process that would rather tune the collector itself sets
``Collector.FREEZE_EVERY = 0`` (never).
"""

from __future__ import annotations

import asyncio
import gc
from typing import ClassVar

__all__ = ["Collector"]


class Collector:
    """One client's share of the collector's tuning; see the module docstring."""

    #: Jobs registered between two freezes (0: never freeze).
    FREEZE_EVERY: ClassVar[int] = 10_000
    #: Clients whose freezes are in force (the last to close unfreezes).
    _freezers: ClassVar[int] = 0
    #: A client closed while others froze: everything was unfrozen, and the next freeze
    #: makes a full pass first, so the closed client's objects are freed, not frozen again.
    _thawed: ClassVar[bool] = False

    def __init__(self) -> None:
        self._grown = 0
        self._pending = False
        self._froze = False
        self._closed = False

    def grew(self) -> None:
        """One more long-lived job (cheap: a count, and at most one callback per burst)."""
        self._grown += 1
        every = self.FREEZE_EVERY
        if not every or self._grown < every or self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a tracker used on its own): nothing to keep a loop from
        self._pending = True
        loop.call_soon(self._freeze)

    def _freeze(self) -> None:
        self._pending = False
        self._grown = 0
        if self._closed:
            return
        if Collector._thawed:
            Collector._thawed = False
            gc.collect()  # once after a client closed: its objects go, not into the freeze
        else:
            gc.collect(1)  # the young garbage is freed, not frozen
        gc.freeze()
        if not self._froze:
            self._froze = True
            Collector._freezers += 1

    def close(self) -> None:
        """The client closed: its objects may be garbage soon (see the module docstring)."""
        self._closed = True
        if not self._froze:
            return
        self._froze = False
        Collector._freezers -= 1
        # Its objects must be collectable once its user lets go of it: everything goes back
        # to the oldest generation (where full passes, natural or ours, free them); clients
        # still open freeze theirs again after their next burst of jobs.
        gc.unfreeze()
        if Collector._freezers:
            Collector._thawed = True
