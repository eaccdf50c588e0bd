"""The protocol layer: Kling's wire protocol as plain values and plain functions.

Models and requests, task families, the one cattrs converter and envelope decoding, backend
profiles and the one rule that resolves credentials, base URL and environment, auth (JWTs),
the retry policy, the poll policy and its schedule. Nothing here does IO: no aiohttp, no
anyio, no sockets, no clock but the one passed in, so every rule is testable without a loop
(gidgethub's habit). The layers above (:mod:`kling_async.http`, :mod:`kling_async.engine`)
import from here; nothing here imports from them.

Internal: the public names are those :mod:`kling_async` exports.
"""
