"""The engine: many jobs behind one account's limits.

The limits (slot and request limiter protocols and their in-process defaults), jobs and their
iterators, the tracker (the one owner of a task's lifecycle and its slot), the submitter, the
pollers, the duration statistics and the job store protocol. It drives the IO shell
(:mod:`kling_async.http`) and never imports an edge (``cli``, ``testing``, ``fastapi``,
``redis``).

Internal: the public names are those :mod:`kling_async` exports.
"""
