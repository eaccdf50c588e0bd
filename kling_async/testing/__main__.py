"""``python -m kling_async.testing``: see :mod:`kling_async.testing._cli`."""

from ._cli import main

raise SystemExit(main())
