"""Each nox session's extra installs every package its code imports, so a fresh `nox -s demo` cannot fail on an
import (or on a package transformers needs at run time) that only the test environment happens to have.

The sessions, the extras they install and the code they run are read from `noxfile.py` and `pyproject.toml`;
the imports from the code, with `ast` (imports inside functions too), following the project's own modules
(`lora_func.*`, the benchmarks' and tests' sibling modules) wherever the session's code reaches them.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib.metadata import packages_distributions as _packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]

# Packages transformers needs at run time without the caller importing them: a file whose code contains the
# key needs every package of the value in its session's extra.
RUNTIME_NEEDS = {"gguf_file=": {"gguf", "accelerate"}}  # transformers reads a GGUF file with gguf, and refuses
# to without accelerate ("accelerate is required when loading a GGUF file")

# The core package's own optional imports, each reached only where the package is already installed.
CORE_OPTIONAL = {
    "bitsandbytes": "imported only to dequantize a bitsandbytes layer the model already holds",
}


@cache
def packages_distributions() -> dict[str, list[str]]:
    return _packages_distributions()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _guarded(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `try: ... except ImportError` (optional imports)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"}:
                for inner in node.body:
                    guarded |= {id(n) for n in ast.walk(inner) if isinstance(n, ast.Import | ast.ImportFrom)}
    return guarded


def _module_file(module: str, search: list[Path]) -> Path | None:
    """The project's own file for `module`, or None for a third-party or standard module."""
    parts = module.split(".")
    for base in search:
        for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


@cache
def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, guarded) of every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text())
    guarded = _guarded(tree)
    package = ".".join(path.relative_to(ROOT).parent.parts)  # what a relative import starts from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in guarded) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
                # `from . import chat` imports a submodule
                found += [(f"{module}.{alias.name}", False) for alias in node.names]
                found.append((module, False))
            else:
                found.append((node.module, id(node) in guarded))
                found += [(f"{node.module}.{alias.name}", id(node) in guarded) for alias in node.names]
    return found


def reached_packages(entries: list[Path]) -> dict[str, set[str]]:
    """{top-level third-party import name: the files importing it} over everything `entries` reach."""
    search = [ROOT, ROOT / "benchmarks", ROOT / "tests"]
    core = ROOT / "lora_func"
    seen: set[Path] = set()
    todo = list(entries)
    packages: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_text()
        for key, needs in RUNTIME_NEEDS.items():
            if key in text:
                for need in needs:
                    packages.setdefault(need, set()).add(str(path.relative_to(ROOT)))
        in_core = path.is_relative_to(core) and not path.is_relative_to(core / "demo")
        for module, guarded in _imports(path):
            own = _module_file(module, search)
            if own is not None:
                todo.append(own)
                continue
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or guarded:
                continue
            if in_core and top in CORE_OPTIONAL:
                continue
            if _module_file(top, search) is not None:  # `from lora_func import x` with x a name, not a module
                continue
            packages.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return packages


def nox_sessions() -> dict[str, tuple[str, list[Path]]]:
    """{session: (extra, the files its commands run)} read from noxfile.py's `install(session, extra, ...)` and
    `session.run("python", ...)` calls; a runner script `X/run.py` runs every `X/*.py` beside it."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    sessions = {}
    for func in tree.body:
        if not isinstance(func, ast.FunctionDef):
            continue
        if not any("session" in ast.unparse(d) for d in func.decorator_list):
            continue
        extra, entries = None, []
        for node in ast.walk(func):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if name == "install" and strings:
                extra = strings[0]
            elif name == "session.run" and strings[:1] == ["python"]:
                if strings[1:2] == ["-m"]:
                    module = strings[2]
                    if module in ("pytest", "pip"):
                        continue
                    package = ROOT.joinpath(*module.split("."))
                    entries.append(package / "__main__.py" if package.is_dir() else package.with_suffix(".py"))
                elif len(strings) > 1 and strings[1].endswith(".py"):
                    script = ROOT / strings[1]
                    entries += sorted(script.parent.glob("*.py")) if script.name == "run.py" else [script]
        if extra is not None and entries:
            sessions[func.name] = (extra, entries)
    return sessions


SESSIONS = nox_sessions()


def test_sessions_are_found() -> None:
    """The reading of noxfile.py itself: the sessions whose extras this file checks are there."""
    assert {"demo", "bench", "notebooks"} <= set(SESSIONS), SESSIONS
    assert SESSIONS["demo"][0] == "demo"
    assert ROOT / "lora_func" / "demo" / "__main__.py" in SESSIONS["demo"][1]


@pytest.mark.parametrize("session", sorted(SESSIONS))
def test_session_extra_lists_its_imports(session: str) -> None:
    extra, entries = SESSIONS[session]
    project = _pyproject()["project"]
    assert extra in project["optional-dependencies"], f"noxfile's `{session}` installs a missing extra {extra!r}"
    installed = {_requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"][extra]}
    distributions = packages_distributions()
    missing = {}
    for top, files in reached_packages(entries).items():
        names = {_normalize(d) for d in distributions.get(top, [top])}
        if not names & installed:
            missing[top] = sorted(files)
    assert not missing, (
        f"nox -s {session}: pyproject's `{extra}` extra lacks packages its code needs (package: files): {missing}"
    )


def test_core_imports_are_dependencies() -> None:
    """lora_func itself (the demo aside) imports only its dependencies, guarded optional packages, or
    `CORE_OPTIONAL` packages reached only where they are installed."""
    project = _pyproject()["project"]
    installed = {_requirement_name(r) for r in project["dependencies"]}
    distributions = packages_distributions()
    core = ROOT / "lora_func"
    files = [p for p in core.rglob("*.py") if not p.is_relative_to(core / "demo")]
    strays = {}
    for path in files:
        for module, guarded in _imports(path):
            top = module.split(".")[0]
            if guarded or top in sys.stdlib_module_names or top in ("__future__", "lora_func") or top in CORE_OPTIONAL:
                continue
            if not {_normalize(d) for d in distributions.get(top, [top])} & installed:
                strays.setdefault(top, []).append(str(path.relative_to(ROOT)))
    assert not strays, f"lora_func imports packages that are not dependencies: {strays}"


def test_detects_a_missing_package(tmp_path: Path) -> None:
    """The check can fail: a file importing a package no extra names, and a GGUF load, are reported."""
    (tmp_path / "uses.py").write_text("def f():\n    import not_a_real_package\n    x(gguf_file='m.gguf')\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = reached_packages([tmp_path / "uses.py"])
    finally:
        ROOT = saved
    assert set(found) == {"not_a_real_package", "gguf", "accelerate"}
