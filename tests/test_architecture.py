"""The architecture contract: the arrows of design.md section 3 point one way.

``protocol <- http (the IO shell) <- engine <- client <- edges``, with ``_errors`` under
everything. Every module under ``kling_async/`` is parsed (never imported) and each import is
resolved to an absolute name, relative ones included; imports under ``if TYPE_CHECKING:`` and
inside functions count too, since they are arrows in the design all the same.

Each rule is one test against the tree, so one broken arrow never hides another, and each rule
is also fed a synthetic module that breaks it, so the contract itself can fail.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kling_async
import kling_async.testing

PACKAGE = "kling_async"
ROOT = Path(kling_async.__file__).resolve().parent

#: Libraries that do IO (or pull in an event loop, a terminal or a server): none in protocol/.
IO_LIBRARIES = frozenset(
    {
        "aiohttp",
        "anyio",
        "asyncio",
        "socket",
        "ssl",
        "sqlite3",
        "yarl",
        "multidict",
        "rich",
        "redis",
        "fastapi",
        "starlette",
        "uvicorn",
        "subprocess",
        "threading",
    }
)

#: The edges: they use the public API only (packages and single modules, whichever exist).
EDGES = (f"{PACKAGE}.cli", f"{PACKAGE}.testing", f"{PACKAGE}.fastapi", f"{PACKAGE}.redis")
EMULATOR = f"{PACKAGE}.testing"
TRANSPORT = f"{PACKAGE}.http.transport"
#: The shared account: the command line (``batch --redis``) may use its public names.
REDIS_EDGE = f"{PACKAGE}.redis"
CLI_EDGE = f"{PACKAGE}.cli"

#: Where every module lives. A module outside these has no layer, so no rule would see it.
LAYERS = {
    "the public names": (PACKAGE,),
    "the base layer": (f"{PACKAGE}._errors", f"{PACKAGE}._version", f"{PACKAGE}._logging"),
    "protocol": (f"{PACKAGE}.protocol",),
    "the IO shell": (f"{PACKAGE}.http",),
    "the engine": (f"{PACKAGE}.engine",),
    "the client": (f"{PACKAGE}._client",),
    "the edges": EDGES,
}


def within(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or a module or name inside it."""
    return name == prefix or name.startswith(prefix + ".")


def within_any(name: str, prefixes: Iterable[str]) -> bool:
    return any(within(name, prefix) for prefix in prefixes)


def placed(name: str, places: Iterable[str]) -> bool:
    """``name`` is one of ``places`` or inside one (the top-level package only as itself)."""
    return any(name == place if place == PACKAGE else within(name, place) for place in places)


# -- reading imports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported name, resolved: ``import base`` or ``from base import name``."""

    base: str
    name: str | None
    line: int

    @property
    def targets(self) -> tuple[str, ...]:
        """What it may bring in: the module, and for ``from m import x`` also ``m.x``."""
        if self.name is None:
            return (self.base,)
        return (self.base, f"{self.base}.{self.name}")

    @property
    def library(self) -> str:
        """The top-level package imported from (``aiohttp`` for ``from aiohttp import web``)."""
        return self.base.partition(".")[0]

    def __str__(self) -> str:
        if self.name is None:
            return f"import {self.base}"
        return f"from {self.base} import {self.name}"


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    imports: tuple[Import, ...]


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module a ``from`` import names (``level`` dots, then ``target``)."""
    if level == 0:
        assert target is not None
        return target
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        raise ValueError(f"{module}: a relative import goes above the top-level package")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{target}" if target else base


def parse_module(name: str, source: str, *, is_package: bool = False, path: str = "") -> Module:
    """Every import in ``source`` (module ``name``), wherever it sits in the file."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=path or name)):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            found.extend(Import(base, alias.name, node.lineno) for alias in node.names)
    found.sort(key=lambda item: item.line)
    return Module(name, path or name, tuple(found))


def package_modules(root: Path = ROOT) -> list[Module]:
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent)
        parts = list(relative.with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules.append(
            parse_module(
                ".".join(parts),
                path.read_text(encoding="utf-8"),
                is_package=is_package,
                path=relative.as_posix(),
            )
        )
    return modules


# -- the rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Public:
    """The public names edges may import: ``kling_async.__all__`` and the emulator's (and,
    for the command line only, ``kling_async.redis.__all__``)."""

    top: frozenset[str]
    testing: frozenset[str]
    redis: frozenset[str] = frozenset()


#: A check answers why an import breaks its rule, or None when it does not.
Check = Callable[[Module, Import, Public], str | None]


@dataclass(frozen=True)
class Rule:
    id: str
    text: str
    applies: Callable[[str], bool]
    check: Check


@dataclass(frozen=True)
class Violation:
    rule: Rule
    module: Module
    imported: Import
    why: str

    def __str__(self) -> str:
        return (
            f"{self.module.path}:{self.imported.line}: `{self.imported}` in {self.module.name} "
            f"breaks rule {self.rule.id!r}: {self.why}"
        )


def _from_the_sdk(imported: Import, forbidden: Iterable[str]) -> str | None:
    for target in imported.targets:
        for prefix in forbidden:
            if within(target, prefix):
                return f"it reaches into {prefix}"
    return None


def _top_level_package(imported: Import) -> str | None:
    # The top-level package imports the client and everything under it: a cycle from below.
    if imported.base == PACKAGE:
        return f"{PACKAGE} itself imports the client; import the module that defines the name"
    return None


def _protocol(module: Module, imported: Import, public: Public) -> str | None:
    if imported.library in IO_LIBRARIES:
        return f"{imported.library} is an IO library; protocol/ is pure (plain values, no IO)"
    below = (f"{PACKAGE}.http", f"{PACKAGE}.engine", f"{PACKAGE}._client", *EDGES)
    return _top_level_package(imported) or _from_the_sdk(imported, below)


def _shell(module: Module, imported: Import, public: Public) -> str | None:
    above = (f"{PACKAGE}.engine", f"{PACKAGE}._client", *EDGES)
    return _top_level_package(imported) or _from_the_sdk(imported, above)


def _engine(module: Module, imported: Import, public: Public) -> str | None:
    above = (f"{PACKAGE}._client", *EDGES)
    return _top_level_package(imported) or _from_the_sdk(imported, above)


def _base(module: Module, imported: Import, public: Public) -> str | None:
    if within(imported.base, PACKAGE) and not within(imported.base, module.name):
        return "the base layer sits under everything, so it imports nothing from the package"
    return None


def _core(module: Module, imported: Import, public: Public) -> str | None:
    return _from_the_sdk(imported, EDGES)


def _own_edge(name: str) -> str:
    return next(edge for edge in EDGES if within(name, edge))


def _edge(module: Module, imported: Import, public: Public) -> str | None:
    own = _own_edge(module.name)
    if not within(imported.base, PACKAGE) or within(imported.base, own):
        return None
    if imported.name is None:
        if imported.base in (PACKAGE, EMULATOR):
            return None
    elif imported.base == PACKAGE:
        if imported.name in public.top or imported.name == "testing":
            return None
    elif (imported.base == EMULATOR and imported.name in public.testing) or (
        # The command line shares a batch through the shared account (batch --redis).
        imported.base == REDIS_EDGE and imported.name in public.redis and own == CLI_EDGE
    ):
        return None
    return (
        f"edges use only `{PACKAGE}` (names in its __all__) and `{EMULATOR}` (names in its "
        f"__all__), and the command line also `{REDIS_EDGE}` (names in its __all__); export "
        "what is missing instead of reaching into a private module"
    )


def _emulator(module: Module, imported: Import, public: Public) -> str | None:
    if within(imported.base, PACKAGE) and not within(imported.base, EMULATOR):
        return "the emulator is an independent implementation of the protocol, not a user of it"
    return None


def _aiohttp_client(module: Module, imported: Import, public: Public) -> str | None:
    if imported.library == "aiohttp":
        return f"only {TRANSPORT} talks to aiohttp; go through its HttpTransport"
    return None


RULES = (
    Rule(
        "protocol-is-pure",
        f"{PACKAGE}.protocol.* imports no IO library and nothing from http, engine, the "
        "client or an edge",
        lambda name: within(name, f"{PACKAGE}.protocol"),
        _protocol,
    ),
    Rule(
        "shell-below-engine",
        f"{PACKAGE}.http.* imports nothing from the engine, the client or an edge",
        lambda name: within(name, f"{PACKAGE}.http"),
        _shell,
    ),
    Rule(
        "engine-below-client",
        f"{PACKAGE}.engine.* imports nothing from the client or an edge",
        lambda name: within(name, f"{PACKAGE}.engine"),
        _engine,
    ),
    Rule(
        "errors-are-the-base",
        f"{PACKAGE}._errors (and _version) import nothing from the rest of the package",
        lambda name: name in (f"{PACKAGE}._errors", f"{PACKAGE}._version"),
        _base,
    ),
    Rule(
        "core-below-edges",
        "nothing outside the edges imports an edge (edges need extras and use the core)",
        lambda name: within(name, PACKAGE) and not within_any(name, EDGES),
        _core,
    ),
    Rule(
        "edges-use-the-public-api",
        "edges import from the SDK only the top-level package and kling_async.testing, by "
        "their public names",
        lambda name: within_any(name, EDGES),
        _edge,
    ),
    Rule(
        "emulator-is-independent",
        f"{EMULATOR} imports nothing from the SDK",
        lambda name: within(name, EMULATOR),
        _emulator,
    ),
    Rule(
        "one-aiohttp-client",
        f"aiohttp is imported only by {TRANSPORT} (and the emulator, a server)",
        lambda name: name != TRANSPORT and not within(name, EMULATOR),
        _aiohttp_client,
    ),
)
RULES_BY_ID = {rule.id: rule for rule in RULES}


def violations(modules: Iterable[Module], rules: Iterable[Rule], public: Public) -> list[Violation]:
    rules = tuple(rules)
    found = []
    for module in modules:
        for rule in rules:
            if not rule.applies(module.name):
                continue
            for imported in module.imports:
                why = rule.check(module, imported, public)
                if why is not None:
                    found.append(Violation(rule, module, imported, why))
    return found


def report(found: Iterable[Violation]) -> str:
    """One paragraph per rule: the rule in words, then each import that breaks it."""
    by_rule: dict[str, list[Violation]] = {}
    for violation in found:
        by_rule.setdefault(violation.rule.id, []).append(violation)
    paragraphs = [
        f"rule {rule_id!r}: {group[0].rule.text}\n" + "\n".join(f"  {v}" for v in group)
        for rule_id, group in by_rule.items()
    ]
    total = sum(len(group) for group in by_rule.values())
    return f"{total} import(s) break the architecture contract\n" + "\n".join(paragraphs)


# -- the tree keeps the contract ---------------------------------------------------------------


def _all_of(path: Path) -> frozenset[str]:
    """A module's ``__all__``, read from its source (importing it would need its extra)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


PUBLIC = Public(
    frozenset(kling_async.__all__),
    frozenset(kling_async.testing.__all__),
    _all_of(ROOT / "redis.py"),
)
MODULES = package_modules()


def test_the_package_is_read() -> None:
    names = {module.name for module in MODULES}
    assert {PACKAGE, f"{PACKAGE}._errors", TRANSPORT, f"{EMULATOR}._emulator"} <= names
    transport = next(module for module in MODULES if module.name == TRANSPORT)
    assert "aiohttp" in {imported.library for imported in transport.imports}


def test_every_module_has_a_layer() -> None:
    strays = [
        module.path
        for module in MODULES
        if not any(placed(module.name, places) for places in LAYERS.values())
    ]
    assert not strays, (
        f"modules outside every layer of design.md section 3: {', '.join(strays)}; move each "
        "into protocol/, http/, engine/ or an edge, or add its place to LAYERS in "
        "tests/test_architecture.py (with the rule that keeps its arrows)"
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.id)
def test_the_tree_keeps_the_rule(rule: Rule) -> None:
    found = violations(MODULES, [rule], PUBLIC)
    assert not found, report(found)


# -- each rule can fail ------------------------------------------------------------------------

PUBLIC_FOR_CASES = Public(
    frozenset({"KlingClient", "Task"}), frozenset({"Emulator"}), frozenset({"RedisAccount"})
)

BREAKS = [
    ("protocol-is-pure", "kling_async.protocol.models", "import anyio\n"),
    ("protocol-is-pure", "kling_async.protocol.models", "from asyncio import sleep\n"),
    ("protocol-is-pure", "kling_async.protocol.models", "import aiohttp.web\n"),
    ("protocol-is-pure", "kling_async.protocol.poll", "from ..http.caller import Api\n"),
    ("protocol-is-pure", "kling_async.protocol.poll", "from kling_async.engine import jobs\n"),
    ("protocol-is-pure", "kling_async.protocol.poll", "from kling_async import _client\n"),
    ("protocol-is-pure", "kling_async.protocol.poll", "from kling_async import KlingClient\n"),
    (
        "protocol-is-pure",
        "kling_async.protocol.poll",
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from kling_async._client import KlingClient\n",
    ),
    ("protocol-is-pure", "kling_async.protocol.poll", "def f():\n    import sqlite3\n"),
    ("shell-below-engine", "kling_async.http.caller", "from ..engine.jobs import Job\n"),
    ("shell-below-engine", "kling_async.http.caller", "import kling_async._client\n"),
    ("shell-below-engine", "kling_async.http.caller", "from kling_async.cli import main\n"),
    ("engine-below-client", "kling_async.engine.jobs", "from .._client import KlingClient\n"),
    ("engine-below-client", "kling_async.engine.jobs", "from kling_async import testing\n"),
    ("errors-are-the-base", "kling_async._errors", "from .protocol.models import Task\n"),
    (
        "errors-are-the-base",
        "kling_async._errors",
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from kling_async.protocol.models import Task\n",
    ),
    ("errors-are-the-base", "kling_async._errors", "import kling_async\n"),
    ("core-below-edges", "kling_async._client", "from .testing import Emulator\n"),
    ("core-below-edges", "kling_async", "from kling_async.redis import RedisAccount\n"),
    ("edges-use-the-public-api", "kling_async.cli._run", "from .._client import KlingClient\n"),
    ("edges-use-the-public-api", "kling_async.cli._run", "from kling_async._errors import X\n"),
    ("edges-use-the-public-api", "kling_async.cli._run", "import kling_async.protocol.models\n"),
    ("edges-use-the-public-api", "kling_async.cli._run", "from kling_async import NotPublic\n"),
    ("edges-use-the-public-api", "kling_async.cli._app", "from ..testing._cli import main\n"),
    ("edges-use-the-public-api", "kling_async.fastapi", "from kling_async.engine import jobs\n"),
    ("edges-use-the-public-api", "kling_async.redis", "from ._client import KlingClient\n"),
    ("edges-use-the-public-api", "kling_async.cli._shared", "from ..redis import _Binding\n"),
    (
        "edges-use-the-public-api",
        "kling_async.fastapi",
        "from kling_async.redis import RedisAccount\n",
    ),
    ("emulator-is-independent", "kling_async.testing._server", "from kling_async import Task\n"),
    ("emulator-is-independent", "kling_async.testing._server", "import kling_async\n"),
    ("emulator-is-independent", "kling_async.testing", "from ..protocol import models\n"),
    ("one-aiohttp-client", "kling_async.http.download", "import aiohttp\n"),
    ("one-aiohttp-client", "kling_async.engine.jobs", "from aiohttp import ClientSession\n"),
    ("one-aiohttp-client", "kling_async.cli._run", "import aiohttp.web\n"),
    ("one-aiohttp-client", "kling_async.fastapi", "import aiohttp\n"),
]


@pytest.mark.parametrize(("rule_id", "module", "source"), BREAKS)
def test_a_rule_catches_a_broken_arrow(rule_id: str, module: str, source: str) -> None:
    parsed = parse_module(module, source, is_package=module in ("kling_async", EMULATOR))
    found = violations([parsed], RULES, PUBLIC_FOR_CASES)
    assert rule_id in {violation.rule.id for violation in found}, report(found)
    message = str(next(v for v in found if v.rule.id == rule_id))
    assert module in message
    assert rule_id in message
    assert str(parsed.imports[-1]) in message  # names the import itself


KEEPS = [
    ("kling_async.protocol.models", "import attrs\nfrom kling_async._errors import KlingError\n"),
    ("kling_async.protocol.poll", "from .schedule import DurationModel\n"),
    ("kling_async.protocol.auth", "import jwt\nimport os\nimport time\n"),
    ("kling_async.http.caller", "from ..protocol.retry import RetryPolicy\nimport anyio\n"),
    ("kling_async.http.transport", "import aiohttp\nimport yarl\n"),
    ("kling_async.engine.jobs", "from kling_async.http.resources import TaskResource\n"),
    ("kling_async._client", "from .engine.jobs import Job\nfrom .http import transport\n"),
    ("kling_async", "from kling_async._client import KlingClient\n"),
    ("kling_async._errors", "import re\nfrom urllib.parse import urlsplit\n"),
    ("kling_async.cli._run", "import kling_async\nfrom kling_async import KlingClient, Task\n"),
    ("kling_async.cli._run", "from .. import KlingClient\nfrom ._journal import Journal\n"),
    ("kling_async.cli._run", "from kling_async.testing import Emulator\nimport rich\n"),
    ("kling_async.cli._settings", "from ..testing import Emulator\nimport anyio\n"),
    ("kling_async.cli._shared", "from kling_async.redis import RedisAccount\nimport redis\n"),
    ("kling_async.fastapi", "import fastapi\nfrom kling_async import KlingClient\n"),
    ("kling_async.redis", "import redis.asyncio\nfrom . import KlingClient\n"),
    ("kling_async.testing._server", "from aiohttp import web\nfrom ._state import TaskStore\n"),
    ("kling_async.testing", "from ._emulator import Emulator\n"),
]


@pytest.mark.parametrize(("module", "source"), KEEPS)
def test_allowed_arrows_pass(module: str, source: str) -> None:
    parsed = parse_module(module, source, is_package=module in ("kling_async", EMULATOR))
    found = violations([parsed], RULES, PUBLIC_FOR_CASES)
    assert not found, report(found)


def _imports(module: str, source: str, *, is_package: bool = False) -> list[tuple[str, ...]]:
    return [item.targets for item in parse_module(module, source, is_package=is_package).imports]


def test_relative_imports_resolve_to_absolute_names() -> None:
    assert _imports("kling_async.cli._run", "from . import _files") == [
        ("kling_async.cli", "kling_async.cli._files")
    ]
    assert _imports("kling_async.cli._run", "from .._client import KlingClient") == [
        ("kling_async._client", "kling_async._client.KlingClient")
    ]
    assert _imports("kling_async.cli", "from ._app import main", is_package=True) == [
        ("kling_async.cli._app", "kling_async.cli._app.main")
    ]
    assert _imports("kling_async.cli", "from .. import Task", is_package=True) == [
        ("kling_async", "kling_async.Task")
    ]
    assert _imports("kling_async.a.b.c", "from ...x import y") == [
        ("kling_async.x", "kling_async.x.y")
    ]
    with pytest.raises(ValueError, match="above the top-level package"):
        parse_module("kling_async._errors", "from .. import x")


def test_every_rule_has_a_breaking_case() -> None:
    assert {rule_id for rule_id, _, _ in BREAKS} == set(RULES_BY_ID)


def _layer_of(name: str) -> Iterator[str]:
    return (layer for layer, places in LAYERS.items() if placed(name, places))


def test_a_stray_module_has_no_layer() -> None:
    assert not list(_layer_of("kling_async.utils"))
    assert list(_layer_of("kling_async.engine.tracker")) == ["the engine"]
