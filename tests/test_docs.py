"""The README and the guides in docs/ name only things that exist.

A guide that names a moved file, a renamed module or a removed `make` target misleads the
next reader silently; this reads every page and checks each repository path, Python module
(and the name after it), `python -m` target, `make` target and relative link it names.
Runtime outputs (`data/published/...`, placeholders like `<key>`) are not repository paths
and are skipped by rule, not by list.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Top-level folders whose paths a page may name; `data/` holds run outputs besides the
#: shipped GSM8K file, so only its tracked files are checked (see `_is_repository_path`).
TRACKED_TOPS = ("sampler", "tasks", "flows", "sql", "tests", "deployments", "benchmarks",
                "models", "docs", ".ci", "data/gsm8k")
PACKAGES = ("sampler", "tasks", "flows", "benchmarks")

CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
PYTHON_M = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")
MAKE_TARGET = re.compile(r"(?<![\w-])make ([a-z][\w-]*)")
PATH_TOKEN = re.compile(r"[\w./-]+")
DOTTED = re.compile(r"\b((?:%s)(?:\.\w+)+)\b" % "|".join(PACKAGES))


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _is_repository_path(token: str) -> bool:
    if any(mark in token for mark in "<>*{}=$"):
        return False
    return any(token == top or token.startswith(top + "/") for top in TRACKED_TOPS)


def _code(text: str) -> str:
    """The page's code blocks and inline code: where commands and names are given."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return "\n".join(blocks + CODE_SPAN.findall(prose))


def _named_paths(text: str) -> set[str]:
    paths = set()
    for line in _code(text).splitlines():
        for token in PATH_TOKEN.findall(line):
            token = token.rstrip(".,:;")
            if _is_repository_path(token):
                paths.add(token)
    return paths


@cache
def _top_level_names(module_file: Path) -> frozenset[str]:
    """Names a module defines or imports at its top level (classes, functions, assignments)."""
    tree = ast.parse(module_file.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolves(dotted: str) -> bool:
    """`pkg.module` or `pkg.module.name` (a name the module defines), or `pkg.name`."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:cut]))
        if module is None:
            continue
        rest = parts[cut:]
        return not rest or (len(rest) == 1 and rest[0] in _top_level_names(module))
    return False


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_named_repository_path_exists(page):
    missing = sorted(p for p in _named_paths(page.read_text()) if not (ROOT / p).exists())
    assert not missing, f"{_page_id(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_resolves(page):
    links = [link.split("#")[0] for link in LINK.findall(page.read_text())
             if "://" not in link and not link.startswith("#")]
    missing = sorted(link for link in links if not (page.parent / link).exists())
    assert not missing, f"{_page_id(page)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_named_module_and_python_m_target_exists(page):
    text = _code(page.read_text())
    # `sampler = OptimalSamplingV1(...)` makes `sampler.generate` a method, not a module path
    variables = {name for name in PACKAGES if re.search(rf"^\s*{name} = ", text, re.M)}
    named = {d for d in DOTTED.findall(text)
             if not (d.split(".")[0] in variables and d.count(".") == 1)}
    targets = set(PYTHON_M.findall(text))
    unknown = sorted(d for d in named if not _resolves(d))
    not_runnable = sorted(t for t in targets if _module_file(t) is None)
    assert not unknown, f"{_page_id(page)} names modules or names that do not exist: {unknown}"
    assert not not_runnable, f"{_page_id(page)} has `python -m` targets that do not exist: " \
                             f"{not_runnable}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_named_make_target_exists(page):
    targets = set(MAKE_TARGET.findall(_code(page.read_text())))
    missing = sorted(targets - _make_targets())
    assert not missing, f"{_page_id(page)} names make targets the Makefile lacks: {missing}"


def test_every_guide_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [_page_id(g) for g in PAGES[1:] if f"]({_page_id(g)})" not in readme]
    assert not unlinked, f"guides the README does not link: {unlinked}"


def test_the_checks_catch_what_they_are_for():
    """The rules above would fail on a stale page, not pass on everything."""
    stale = "`sampler/no_such.py`, `python -m flows.no_such`, `sampler.mixing.no_such`"
    assert _named_paths(stale) == {"sampler/no_such.py"}
    assert PYTHON_M.findall(stale) == ["flows.no_such"]
    assert not _resolves("sampler.mixing.no_such")
    assert _resolves("sampler.mixing.MixingConfig") and _resolves("flows.distill")
    assert "nosuchtarget" not in _make_targets() and "test" in _make_targets()
