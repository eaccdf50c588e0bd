"""The public names: ``kling_async.__all__`` and ``kling_async.testing.__all__`` are pinned.

Adding, removing or renaming a public name is a decision, so it shows up here as a one-line
change to a pin (and a CHANGELOG entry), never as a side effect of moving code between modules.
"""

from __future__ import annotations
import __future__

import importlib
import inspect
import pkgutil
import types

import pytest

import kling_async
import kling_async.testing

TOP_LEVEL = [
    "APIError",
    "Account",
    "AccountBinding",
    "AccountError",
    "AccountMember",
    "AccountSettings",
    "AdaptiveLimit",
    "AddressRefused",
    "AmbiguousSubmissionError",
    "AuthenticationError",
    "BackendProfile",
    "BearerAuth",
    "COMETAPI",
    "COMETAPI_BASE_URL",
    "CameraConfig",
    "CameraControl",
    "CameraType",
    "ClientClosedError",
    "ClientStats",
    "ConcurrencyLimitError",
    "CreateOutcome",
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_BYTES",
    "DownloadError",
    "DownloadResult",
    "DurationStats",
    "DurationStore",
    "DurationSummary",
    "IgnoredLookupError",
    "InvalidRequestError",
    "JWTAuth",
    "Job",
    "JobEvent",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "JobStoreError",
    "KNOWN_MODELS",
    "KlingClient",
    "KlingError",
    "LearnedDurations",
    "MemoryJobStore",
    "Mode",
    "OFFICIAL",
    "OFFICIAL_BASE_URL",
    "PolicyError",
    "PollPolicy",
    "RateLimitError",
    "RequestBudget",
    "RequestLimiter",
    "ResponseDecodeError",
    "RestoredError",
    "RetryPolicy",
    "SQLiteJobStore",
    "ServerError",
    "SlotLimiter",
    "Task",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskStatus",
    "Text2VideoRequest",
    "ThrottledError",
    "TransportError",
    "UnknownModelWarning",
    "UnreachableError",
    "UsageError",
    "ValidationError",
    "Video",
    "WaitTimeoutError",
    "__version__",
]

TESTING = [
    "EmulatedTask",
    "EmulatedVideo",
    "Emulator",
    "EmulatorStats",
    "FaultKind",
    "Faults",
    "StateFileError",
    "main",
]

#: The names design.md section 2 (and so the docs and the README) rely on.
DESIGN_NAMES = {
    "KlingClient",
    "Text2VideoRequest",
    "Job",
    "JobEvent",
    "JobStatus",
    "Task",
    "TaskStatus",
    "Video",
    "PollPolicy",
    "RetryPolicy",
    "CameraControl",
    "CameraConfig",
    "KlingError",
    "APIError",
    "AuthenticationError",
    "AccountError",
    "InvalidRequestError",
    "PolicyError",
    "RateLimitError",
    "ConcurrencyLimitError",
    "ServerError",
    "TransportError",
    "ResponseDecodeError",
    "TaskFailedError",
    "TaskNotFoundError",
    "WaitTimeoutError",
    "AmbiguousSubmissionError",
}

PUBLIC_PACKAGES = {"kling_async": TOP_LEVEL, "kling_async.testing": TESTING}


def _module_names() -> list[str]:
    names = ["kling_async"]
    for info in pkgutil.walk_packages(kling_async.__path__, prefix="kling_async."):
        if info.name.rpartition(".")[2] != "__main__":  # importing one runs the program
            names.append(info.name)
    return sorted(names)


def _import(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # An edge whose extra is not installed (fastapi, redis) cannot be checked here.
        if exc.name is not None and not exc.name.startswith("kling_async"):
            pytest.skip(f"{name} needs {exc.name}, which is not installed")
        raise


@pytest.mark.parametrize("package", sorted(PUBLIC_PACKAGES))
def test_all_is_pinned(package: str) -> None:
    exported = list(_import(package).__all__)
    assert len(exported) == len(set(exported)), f"{package}.__all__ lists a name twice"
    assert sorted(exported) == PUBLIC_PACKAGES[package], (
        f"{package}.__all__ changed: if that is intended, update the pin in "
        "tests/test_public_api.py and say so in CHANGELOG.md"
    )


@pytest.mark.parametrize("name", _module_names())
def test_every_name_in_all_exists(name: str) -> None:
    module = _import(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return
    assert all(isinstance(item, str) for item in exported), f"{name}.__all__ holds a non-string"
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ lists names the module does not define: {missing}"


def test_the_names_the_design_relies_on_are_public() -> None:
    missing = DESIGN_NAMES - set(kling_async.__all__)
    assert not missing, f"design.md section 2 relies on names kling_async lacks: {missing}"
    assert "Emulator" in kling_async.testing.__all__


@pytest.mark.parametrize("package", sorted(PUBLIC_PACKAGES))
def test_public_objects_are_defined_in_the_package(package: str) -> None:
    module = _import(package)
    foreign = []
    for item in module.__all__:
        value = getattr(module, item)
        if inspect.isclass(value) or inspect.isfunction(value):
            defined_in = value.__module__
        elif isinstance(value, str | int | float | tuple | frozenset):
            continue  # constants of builtin types carry no module
        elif type(value).__module__ in ("typing", "types"):
            continue  # a type alias (``Literal[...]``, ``A | B``): its module is typing's
        else:
            defined_in = type(value).__module__  # e.g. COMETAPI, a BackendProfile
        if defined_in != "kling_async" and not defined_in.startswith("kling_async."):
            foreign.append(f"{item} (from {defined_in})")
    assert not foreign, (
        f"{package}.__all__ re-exports objects defined outside kling_async: {foreign}; wrap or "
        "alias them in a kling_async module so the public API does not follow another library"
    )


@pytest.mark.parametrize("package", sorted(PUBLIC_PACKAGES))
def test_the_package_namespace_holds_only_public_names(package: str) -> None:
    """``__init__`` is public names only: anything else it imports is underscored or a module."""
    module = _import(package)
    extra = sorted(
        item
        for item, value in vars(module).items()
        if not item.startswith("_")
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, type(__future__.annotations))
        and item not in module.__all__
    )
    assert not extra, f"{package} has public-looking names missing from its __all__: {extra}"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from kling_async import *", namespace)  # noqa: S102 - the import itself is the test
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(kling_async.__all__)


def test_error_tree_shape_the_design_promises() -> None:
    ka = kling_async
    errors = [getattr(ka, item) for item in ka.__all__ if item.endswith("Error")]
    assert all(issubclass(error, ka.KlingError) for error in errors)
    for branch in (
        ka.AuthenticationError,
        ka.AccountError,
        ka.InvalidRequestError,
        ka.PolicyError,
        ka.RateLimitError,
        ka.ConcurrencyLimitError,
        ka.ServerError,
    ):
        assert issubclass(branch, ka.APIError), branch
    assert issubclass(ka.WaitTimeoutError, TimeoutError)
    assert ka.TaskStatus.SUCCEEDED.value == "succeed"
