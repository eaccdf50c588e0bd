"""The IO shell: the thin layer that talks HTTP to Kling, over the pure protocol layer.

The transport (the only aiohttp client import), the authenticated caller, exactly-once
create, the task resources (``kling.text2video``) and result downloads. It knows nothing of
jobs, queues or limits: the engine (:mod:`kling_async.engine`) drives it.

Internal: the public names are those :mod:`kling_async` exports.
"""
