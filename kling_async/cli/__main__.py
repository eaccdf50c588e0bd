"""``python -m kling_async.cli``: the same as the ``kling-async`` console script."""

from . import main

raise SystemExit(main())
