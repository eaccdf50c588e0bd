"""What the package index shows: the README's links must work there (no relative links, each
one pointing at a docs page or a repository file that exists), and the metadata must agree
with the docs site it names. The built wheel and sdist are checked in CI
(``.ci/check_dists.py``, after ``python -m build`` and ``twine check --strict``)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
URLS: dict[str, str] = PROJECT["urls"]
DOCS = URLS["Documentation"]
REPOSITORY = URLS["Repository"]

# [text](target) and <img src="target">, outside code: enough for a README written by hand.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img [^>]*src=\"([^\"]+)\"")


def _prose(markdown: str) -> str:
    """The Markdown without its fenced code blocks (a link-like string in code is code)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def readme_links() -> list[str]:
    text = _prose((ROOT / "README.md").read_text())
    return [a or b for a, b in _LINK.findall(text)]


def where(url: str) -> Path | None:
    """The file of this checkout a README link stands for, or None if it names none."""
    if url.startswith(DOCS):
        page = url[len(DOCS) :].split("#", 1)[0].strip("/")
        candidates = [ROOT / "docs" / "index.md"] if not page else []
        candidates += [ROOT / "docs" / f"{page}.md", ROOT / "docs" / page / "index.md"]
        if "." in page.rsplit("/", 1)[-1]:  # an image or another file of the site
            candidates = [ROOT / "docs" / page]
        return next((c for c in candidates if c.exists()), None)
    for kind in ("blob", "tree"):
        prefix = f"{REPOSITORY}/{kind}/main/"
        if url.startswith(prefix):
            path = ROOT / url[len(prefix) :].split("#", 1)[0]
            return path if path.exists() else None
    return None


def test_the_readme_has_links() -> None:
    assert len(readme_links()) >= 5


@pytest.mark.parametrize("url", readme_links())
def test_every_readme_link_works_on_the_package_index(url: str) -> None:
    """The index renders the README away from the repository: a relative link is dead
    there, so every link is absolute, and one into the docs or the repository names a page
    or file this checkout has."""
    if url.startswith("#"):
        return  # an anchor of the README itself
    assert re.match(r"https://", url), f"{url!r} is relative (or not https): dead on the index"
    if url.startswith((DOCS, REPOSITORY)) and url.rstrip("/") not in {
        DOCS.rstrip("/"),
        REPOSITORY,
        URLS["Issues"],
    }:
        assert where(url) is not None, f"{url!r} names no docs page or file of this project"


def test_the_project_urls_agree_with_the_docs_site() -> None:
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {DOCS}" in mkdocs
    assert f"repo_url: {REPOSITORY}" in mkdocs
    assert URLS["Changelog"] == f"{REPOSITORY}/blob/main/CHANGELOG.md"
    assert URLS["Homepage"] == REPOSITORY


def test_the_classifiers_claim_only_what_holds() -> None:
    """The client runs on asyncio (aiohttp), not on trio: no AnyIO framework claim; each
    Python version claimed is one the test sessions run."""
    classifiers: list[str] = PROJECT["classifiers"]
    assert "Framework :: AnyIO" not in classifiers
    assert "Framework :: AsyncIO" in classifiers
    assert "Typing :: Typed" in classifiers and (ROOT / "kling_async" / "py.typed").exists()
    noxfile = (ROOT / "noxfile.py").read_text()
    for version in re.findall(r"Python :: (3\.\d+)$", "\n".join(classifiers), flags=re.M):
        assert f'"{version}"' in noxfile, f"Python {version} is claimed and never tested"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
