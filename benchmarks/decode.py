"""Decode cost per task: the cattrs converter against the hand-written decoder it replaced.

``python -m benchmarks decode`` structures the same parsed bodies with both, side by side in one
process, interleaved round by round so drift hits both alike, and prints the best round of each:

- ``task``: a create answer's ``data`` (``submitted``, with ``task_info``, timestamps);
- ``succeeded``: a finished task with one video (string ``duration``, ``watermark_url``);
- ``list``: a list page of 500 tasks in mixed states, some failed with a reason.

One line per contender and body::

    decode contender=legacy body=task us_per_task=... ratio=1.000
    decode contender=converter body=task us_per_task=... ratio=...

``ratio`` is the contender's time over the legacy decoder's (below 1 is faster). JSON parsing
and the envelope are shared code and left out: only the structuring differs. Both decode with
a redactor holding one secret, as the client does (it cleans failure reasons).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kling_async._errors import Redactor
from kling_async.protocol import converter as current

from . import _legacy_decode as legacy

_T0 = 1_774_711_071_284


def _submitted(n: int) -> dict[str, Any]:
    return {
        "task_id": str(866889456698785798 + n),
        "task_status": "submitted",
        "task_info": {"external_task_id": f"kb-batch-{n}"},
        "created_at": _T0 + n,
        "updated_at": _T0 + n,
    }


def _succeeded(n: int) -> dict[str, Any]:
    return {
        "task_id": str(866889456698785798 + n),
        "task_status": "succeed",
        "task_status_msg": "",
        "task_info": {"external_task_id": f"kb-batch-{n}"},
        "task_result": {
            "videos": [
                {
                    "id": f"v-{n}",
                    "url": f"https://cdn.klingai.example/bs2/upload/{n}.mp4?sig=abc&exp=1",
                    "duration": "5.1",
                    "watermark_url": f"https://cdn.klingai.example/wm/{n}.mp4",
                }
            ]
        },
        "final_unit_deduction": "1",
        "created_at": _T0 + n,
        "updated_at": _T0 + n + 240_000,
    }


def _page(size: int) -> list[dict[str, Any]]:
    page: list[dict[str, Any]] = []
    for n in range(size):
        kind = n % 4
        if kind == 0:
            page.append(_succeeded(n))
        elif kind == 1:
            page.append({**_submitted(n), "task_status": "processing", "task_result": {}})
        elif kind == 2:
            page.append(
                {
                    **_submitted(n),
                    "task_status": "failed",
                    "task_status_msg": "Image pixel is invalid",
                    "task_result": {},
                }
            )
        else:
            page.append(_submitted(n))
    return page


BODIES: dict[str, tuple[Any, int]] = {
    "task": (_submitted(1), 1),
    "succeeded": (_succeeded(2), 1),
    "list": (_page(500), 500),
}

Decoder = Callable[[Any, Redactor], object]

CONTENDERS: dict[str, tuple[Decoder, Decoder]] = {
    # (one task, one list page)
    "legacy": (
        lambda data, redact: legacy.structure_task(data, redact=redact),
        lambda data, redact: legacy.structure_task_list(data, redact=redact),
    ),
    "converter": (
        lambda data, redact: current.structure_task(data, redact=redact),
        lambda data, redact: current.structure_task_list(data, redact=redact),
    ),
}


def _round(decode: Decoder, data: Any, redact: Redactor, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        decode(data, redact)
    return time.perf_counter() - started


def run(rounds: int = 15, target_tasks: int = 20_000) -> None:
    redact = Redactor(lambda: ("sk-bench-CANARY-5b2d46807f3a9c1e",))
    for body, (data, tasks) in BODIES.items():
        calls = max(1, target_tasks // tasks)
        best: dict[str, float] = {}
        for name, (one, many) in CONTENDERS.items():
            decode = many if isinstance(data, list) else one
            # Same answer from both, or the comparison means nothing.
            assert decode(data, redact) == CONTENDERS["legacy"][isinstance(data, list)](
                data, redact
            ), name
            _round(decode, data, redact, max(1, calls // 10))  # warm-up
        for _ in range(rounds):
            for name, (one, many) in CONTENDERS.items():
                decode = many if isinstance(data, list) else one
                elapsed = _round(decode, data, redact, calls)
                best[name] = min(best.get(name, float("inf")), elapsed)
        base = best["legacy"]
        for name, elapsed in best.items():
            us_per_task = elapsed / (calls * tasks) * 1e6
            print(
                f"decode contender={name} body={body} us_per_task={us_per_task:.3f} "
                f"ratio={elapsed / base:.3f}",
                flush=True,
            )
