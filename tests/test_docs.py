"""The documentation names only things that exist: files, links and Python names.

README.md and docs/*.md are read as text; every relative link and every repository path in
backquotes must exist, every dotted `commcomp.`/`launch.` name must import (module) or resolve
(attribute), and the README stays short.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("commcomp", "launch", "benchmarks", "tests", "scripts", "docs", ".ci")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(rf"`((?:{'|'.join(re.escape(t) for t in TOP)})/[\w./-]*)")
NAME = re.compile(r"(?<![\w.])((?:commcomp|launch)(?:\.[A-Za-z_]\w*)+)")
IMPORT = re.compile(r"^\s*from ((?:commcomp|launch)[\w.]*) import ([\w, ]+)", re.MULTILINE)


def _resolves(dotted: str) -> bool:
    """Import the longest module prefix of `dotted`, then look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_exist(page: Path) -> None:
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(f"link {target}")
    for path in PATH.findall(text):
        if not (ROOT / path.rstrip("/.")).exists():
            missing.append(f"path {path}")
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_names_resolve(page: Path) -> None:
    text = page.read_text()
    imported = set()  # `from commcomp.x import a, b as c` in code blocks: commcomp.x.a, commcomp.x.b
    for module, names in IMPORT.findall(text):
        imported |= {f"{module}.{name.split()[0]}" for name in names.split(",") if name.strip()}
    names = sorted(set(NAME.findall(text)) | imported)
    unresolved = [name for name in names if not _resolves(name)]
    assert not unresolved, f"{page.relative_to(ROOT)} names what does not import: {unresolved}"


def test_readme_is_short_and_self_contained() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES:  # files that are not in the repository
        for outside in ("ALGORITHMS.md", "ENVIRONMENT.md"):
            assert outside not in page.read_text(), f"{page.relative_to(ROOT)} refers to {outside}"
