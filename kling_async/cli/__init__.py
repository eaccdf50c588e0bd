"""``kling-async``, the command line: ``batch`` a prompt file into clips, ``status`` of a batch,
and a local ``emulator``. Install it with ``pip install "kling-async[cli]"``; see docs/cli.md.

``kling-async emulator``, ``--help``, ``--version`` and usage errors work without the extra
(rich): only ``batch`` and ``status`` need it, and say so.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run the command line and return its exit status."""
    from ._app import main as app_main

    return app_main(argv)
