"""Check the built wheel and sdist hold what a user of the package needs (CI, after build).

The wheel must ship ``py.typed`` (so type checkers read the package's annotations), the
LICENSE and the console script; the sdist must carry the LICENSE and the tests.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path


def main(folder: str) -> int:
    dists = Path(folder)
    wheels = sorted(dists.glob("kling_async-*.whl"))
    sdists = sorted(dists.glob("kling_async-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {folder}, found {wheels + sdists}")
        return 1
    problems = []
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        needed: tuple[str, ...] = ("kling_async/py.typed", "kling_async/__init__.py")
        problems += [f"the wheel lacks {n}" for n in needed if n not in names]
        if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
            problems.append("the wheel lacks its LICENSE")
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        if "kling-async = kling_async.cli:main" not in wheel.read(entry_points).decode():
            problems.append("the wheel lacks the kling-async console script")
        if any(n.startswith(("tests/", "benchmarks/")) for n in names):
            problems.append("the wheel ships tests or benchmarks")
    with tarfile.open(sdists[0]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
        needed = ("LICENSE", "README.md", "pyproject.toml", "kling_async/py.typed")
        problems += [f"the sdist lacks {n}" for n in needed if n not in members]
        if not any(m.startswith("tests/") for m in members):
            problems.append("the sdist lacks the tests")
    for problem in problems:
        print(problem)
    if not problems:
        print(f"dists: {wheels[0].name} and {sdists[0].name} hold what they should")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
