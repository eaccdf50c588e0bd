"""The error tree is complete in one module: every public exception is a KlingError defined in
``kling_async._errors`` and drawn in its docstring; every exception class the SDK defines
anywhere else is a private signal; API errors say code, status and request id, never a secret.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async import _errors

PUBLIC = {name: getattr(ka, name) for name in ka.__all__}
PUBLIC_EXCEPTIONS = {
    name: value
    for name, value in PUBLIC.items()
    if isinstance(value, type) and issubclass(value, BaseException)
}
#: The edges (the batch tool, the emulator) have errors of their own; they are not the SDK's.
EDGES = ("kling_async/cli/", "kling_async/testing/")
#: Private control-flow signals that never reach a caller (see the _errors docstring).
PRIVATE_SIGNALS = {"Disowned", "LandedUnseen", "_Expired", "_Retryable"}
SECRET = "sk-canary-5e0f2a7c9b1d3864"


def drawn_names() -> set[str]:
    """The class names drawn in the tree of the module docstring."""
    doc = _errors.__doc__ or ""
    return set(re.findall(r"(?m)^\s+[│├└─\s]*([A-Z][A-Za-z]+)\b", doc))


def test_every_public_exception_is_defined_in_the_error_module_and_drawn() -> None:
    assert PUBLIC_EXCEPTIONS, "no exception is public?"
    drawn = drawn_names()
    for name, cls in PUBLIC_EXCEPTIONS.items():
        assert cls.__module__ == "kling_async._errors", f"{name} is defined in {cls.__module__}"
        assert name in drawn, f"{name} is not drawn in the kling_async._errors tree"
        if issubclass(cls, Warning):
            continue  # warnings are issued, not raised
        assert issubclass(cls, ka.KlingError), f"{name} is not a KlingError"


def test_the_drawn_tree_matches_the_classes() -> None:
    """Every name drawn is a class of the module, and each sits under the parent drawn."""
    doc = _errors.__doc__ or ""
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        match = re.match(r"^(\s+[│├└─\s]*)([A-Z][A-Za-z]+)\b", line)
        if match is None or not line.strip():
            continue
        depth = len(match.group(1))
        name = match.group(2)
        cls = getattr(_errors, name, None)
        if cls is None:
            assert name in ("UserWarning",), f"{name} is drawn but not defined"
            cls = UserWarning
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parent_name = stack[-1][1]
            parent = getattr(_errors, parent_name, None) or UserWarning
            assert issubclass(cls, parent), f"{name} is drawn under {parent_name}"
        stack.append((depth, name))


def test_every_error_class_of_the_error_module_is_drawn() -> None:
    drawn = drawn_names()
    for name in _errors.__all__:
        value = getattr(_errors, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert name in drawn, f"_errors.{name} is not drawn in the tree"


def test_no_exception_class_is_defined_elsewhere_in_the_sdk() -> None:
    """Outside the edges, an exception class lives in _errors, or is a named private signal."""
    root = Path(ka.__file__).parent
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).as_posix()
        if relative.startswith(EDGES) or relative == "kling_async/_errors.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or node.name in PRIVATE_SIGNALS:
                continue
            if any(
                isinstance(base, ast.Name)
                and re.search(r"(Error|Exception|Warning|Refused)$", base.id)
                for base in node.bases
            ):
                found.append(f"{relative}: {node.name}")
    assert found == []


def test_the_error_module_imports_nothing_of_the_sdk() -> None:
    """No cycle with the models: the errors read a task through a small protocol."""
    tree = ast.parse(Path(_errors.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("kling_async"), node.module
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("kling_async") for alias in node.names)


def test_every_sdk_module_imports() -> None:
    """Moving classes into _errors left every module importable (re-exports included)."""
    for module in pkgutil.walk_packages(ka.__path__, "kling_async."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    from kling_async.http.addresses import AddressRefused
    from kling_async.http.resources import IgnoredLookupError  # type: ignore[attr-defined]

    assert AddressRefused is _errors.AddressRefused
    assert IgnoredLookupError is _errors.IgnoredLookupError


API_ERRORS = sorted(
    (
        cls
        for cls in vars(_errors).values()
        if isinstance(cls, type) and issubclass(cls, ka.APIError)
    ),
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("cls", API_ERRORS, ids=lambda cls: cls.__name__)
@given(
    code=st.integers(1000, 5999) | st.sampled_from(["model_not_found", "task_not_exist"]),
    status=st.sampled_from([400, 401, 403, 404, 429, 500, 503]),
    request_id=st.text("abcdef0123456789-", min_size=1, max_size=36),
)
def test_api_errors_carry_code_status_and_request_id_without_secrets(
    cls: type[ka.APIError], code: int | str, status: int, request_id: str
) -> None:
    redact = _errors.Redactor(lambda: [SECRET])
    message = redact(f"rejected Authorization: Bearer {SECRET} and key {SECRET}")
    error = cls(message, code=code, http_status=status, request_id=request_id)
    text = str(error)
    assert f"code {code}" in text
    assert f"HTTP {status}" in text
    assert f"request_id {request_id}" in text
    assert SECRET not in text
    assert SECRET not in repr(error)
    assert (error.code, error.http_status, error.request_id) == (code, status, request_id)


def test_usage_error_and_address_refused_are_kling_errors() -> None:
    assert issubclass(ka.UsageError, ka.KlingError)
    refused = _errors.AddressRefused("10.0.0.1", "is a private address")
    assert isinstance(refused, ka.DownloadError)
    assert isinstance(refused, OSError)
    assert str(refused) == "host '10.0.0.1' is a private address"


@pytest.mark.anyio
async def test_a_transport_used_before_open_raises_usage_error() -> None:
    from kling_async.http.transport import HttpTransport, Timeouts

    transport = HttpTransport("http://127.0.0.1:9", timeouts=Timeouts())
    with pytest.raises(ka.UsageError, match="async with KlingClient"):
        await transport.send("GET", "/v1/videos/text2video/1", authorization="Bearer x")
