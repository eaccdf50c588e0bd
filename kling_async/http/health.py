"""What the client has learned about the API host from the outcome of every request.

Two facts matter to everything that waits on the network:

* **Reachability.** A refused connection, a DNS or TLS failure, a connect timeout: nothing was
  sent, so it is safe to try again, but not forever. Once the host has failed every connect
  for ``unreachable_after`` seconds with no answer in between, the client gives up on it: the
  work waiting on it ends with :class:`UnreachableError` within about that time, instead of
  each job retrying on its own schedule for minutes. The first answer of any kind resets it.
* **Recovery.** After a run of failures (5xx, dropped connections, no connection), the first
  good answer is news for everyone backing off: :meth:`Health.wait_recovered` wakes them, so
  throughput is back within moments of the server, not after the longest back-off.
"""

from __future__ import annotations

import time

import anyio

from kling_async._errors import TransportError, UnreachableError

__all__ = ["Health"]


class Health:
    """Fed by the authenticated caller; read by the submitter, the pollers and ``stats``."""

    def __init__(self, host: str, *, unreachable_after: float | None) -> None:
        self.host = host
        self.unreachable_after = unreachable_after
        #: When the current run of connect failures began (monotonic), None when connected.
        self.connect_failing_since: float | None = None
        #: The last connect failure of that run, in a few words ("connection refused").
        self.connect_error: str | None = None
        self.connect_failures = 0
        self._failing = False
        self._recovered = anyio.Event()

    # --- outcomes -----------------------------------------------------------------------------

    def answered(self, *, server_error: bool) -> None:
        """An HTTP answer arrived; ``server_error`` if it was a 5xx."""
        self.connect_failing_since = None
        self.connect_error = None
        if server_error:
            self._failing = True
        elif self._failing:
            self._failing = False
            self._recovered.set()
            self._recovered = anyio.Event()

    def failed(self, error: TransportError) -> None:
        """No answer: a connect failure (nothing sent) or a dropped or timed-out request."""
        self._failing = True
        if error.request_sent:
            return
        self.connect_failures += 1
        if self.connect_failing_since is None:
            self.connect_failing_since = time.monotonic()
        self.connect_error = error.reason or str(error)

    # --- verdicts -----------------------------------------------------------------------------

    @property
    def failing_for(self) -> float:
        """Seconds the host has refused every connect (0 when connected)."""
        since = self.connect_failing_since
        return 0.0 if since is None else time.monotonic() - since

    def unreachable(self) -> UnreachableError | None:
        """The error to end waiting work with, once the host counts as unreachable."""
        if self.unreachable_after is None or self.connect_failing_since is None:
            return None
        seconds = self.failing_for
        if seconds < self.unreachable_after:
            return None
        return UnreachableError(self.host, seconds, self.connect_error or "no answer")

    def until_verdict(self) -> float | None:
        """Seconds until the host would count as unreachable if nothing gets through."""
        if self.unreachable_after is None or self.connect_failing_since is None:
            return None
        return max(0.0, self.unreachable_after - self.failing_for)

    async def wait_recovered(self, at_most: float) -> None:
        """Sleep ``at_most`` seconds, or less if a good answer ends a run of failures."""
        with anyio.move_on_after(at_most):
            await self._recovered.wait()
