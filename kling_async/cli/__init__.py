"""``kling-async``, the command line: ``batch`` a prompt file into clips, ``status`` of a batch,
and a local ``emulator``. Install it with ``pip install "kling-async[cli]"``; see docs/cli.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: run the command line and return its exit status."""
    try:
        import rich  # noqa: F401 (the [cli] extra)
    except ImportError:
        sys.stderr.write(
            'kling-async: the command line needs the cli extra: pip install "kling-async[cli]"\n'
        )
        return 2
    from ._app import main as app_main  # after the check: it imports rich

    return app_main(argv)
