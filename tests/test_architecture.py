"""The package's layers: models (and prompts) <- tasks <- flows, no import upward, no import cycle.

The checker reads every module's source (AST), with the imports inside functions and under
``TYPE_CHECKING`` too: an import that runs only sometimes still ties the two modules together. It
runs on the installed package, and on small fake packages that show it fails on each mistake.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: esvr's layers: a module may import its own layer and the ones below it
LAYERS = {"esvr": 0, "esvr.models": 0, "esvr.prompts": 0, "esvr.tasks": 1, "esvr.flows": 2}
#: third-party packages a layer must not import (stages are plain functions; flows wrap them in Prefect)
FORBIDDEN = {"esvr.models": ("prefect",), "esvr.tasks": ("prefect",)}


# --------------------------------------------------------------------------------------------
# the checker
# --------------------------------------------------------------------------------------------


def modules_under(package: str, folder: Path) -> dict[str, Path]:
    """Every module of `package` (whose files are in `folder`) and of its subpackages, by name."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if any(not (folder.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # a folder without __init__.py is not part of the package
        name = ".".join([package, *(p for p in parts if p != "__init__")])
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The modules `name` imports anywhere in its source -> the line of the first import.

    Names of `known` modules resolve to the module (``from a.b import c`` is module ``a.b.c`` when
    that exists, else ``a.b``); anything else is kept as its top-level name (``prefect``).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in known and "." in target:
            target = target.rpartition(".")[0]
        if target and target != name:
            targets.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
    return targets


def layer_of(module: str, layers: dict[str, int]) -> tuple[str, int] | None:
    """The (package, level) of the longest layer prefix of `module`."""
    best = None
    for package, level in layers.items():
        if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[0])):
            best = (package, level)
    return best


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_problems(
    packages: dict[str, Path], layers: dict[str, int], forbidden: dict[str, tuple[str, ...]] | None = None
) -> list[str]:
    """Every upward import, forbidden import and import cycle among the modules of `packages`
    (package name -> its folder), as lines that name the file and line."""
    files: dict[str, Path] = {}
    for package, folder in packages.items():
        files.update(modules_under(package, folder))
    known = set(files)
    graph = {name: imports_of(name, path, known) for name, path in files.items()}
    problems = []
    for name, targets in sorted(graph.items()):
        mine = layer_of(name, layers)
        if mine is None:
            problems.append(f"{files[name]}: module {name} belongs to no layer of {sorted(layers)}")
            continue
        for target, line in sorted(targets.items()):
            theirs = layer_of(target, layers) if target in known else None
            if theirs is not None and theirs[1] > mine[1]:
                problems.append(
                    f"{files[name]}:{line}: {name} ({mine[0]}, layer {mine[1]}) imports {target} "
                    f"({theirs[0]}, layer {theirs[1]}) upward"
                )
            for top in (forbidden or {}).get(mine[0], ()):
                if target == top or target.startswith(top + "."):
                    problems.append(f"{files[name]}:{line}: {name} imports {target}, which {mine[0]} must not")
    for component in cycles(graph):
        problems.append("import cycle among " + ", ".join(component))
    return problems


# --------------------------------------------------------------------------------------------
# the installed package
# --------------------------------------------------------------------------------------------


def installed_packages() -> list[str]:
    """The packages pyproject.toml installs."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not an importable package"
    return Path(list(spec.submodule_search_locations)[0])


def test_the_package_imports_only_downward_and_without_cycles():
    roots = {name: package_folder(name) for name in LAYERS}
    problems = layer_problems(roots, LAYERS, FORBIDDEN)
    assert not problems, "\n".join(problems)


def test_every_subpackage_is_installed():
    """A folder with an __init__.py that pyproject.toml does not list would be missing from a wheel."""
    listed = set(installed_packages())
    for name in LAYERS:
        folder = package_folder(name)
        subpackages = {f"{name}.{'.'.join(p.parent.relative_to(folder).parts)}".rstrip(".") for p in folder.rglob("__init__.py")}
        assert subpackages <= listed, f"pyproject.toml [tool.setuptools] packages lacks {sorted(subpackages - listed)}"
    assert {p.partition(".")[0] for p in listed} == {"esvr"}
    assert all(layer_of(p, LAYERS) is not None for p in listed), f"a package outside the layers {sorted(LAYERS)}"


# --------------------------------------------------------------------------------------------
# the checker on planted mistakes
# --------------------------------------------------------------------------------------------


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    """A package `fake` with `files` (relative path -> source) laid out like esvr's layers."""
    root = tmp_path / "fake"
    for rel, source in {
        "__init__.py": "",
        "models/__init__.py": "",
        "tasks/__init__.py": "",
        "flows/__init__.py": "",
        **files,
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return {"fake": root}


FAKE_LAYERS = {"fake": 0, "fake.models": 0, "fake.tasks": 1, "fake.flows": 2}
CLEAN = {
    "models/chat.py": "import json\n",
    "tasks/stage/__init__.py": "",
    "tasks/stage/work.py": "from fake.models import chat\nfrom . import helpers\n",
    "tasks/stage/helpers.py": "from fake.models.chat import json\n",
    "flows/stage.py": "from fake.tasks.stage.work import helpers\nimport prefect\n",
}


def test_a_clean_fake_package_passes(tmp_path):
    assert layer_problems(_fake_package(tmp_path, CLEAN), FAKE_LAYERS, {"fake.tasks": ("prefect",)}) == []


@pytest.mark.parametrize(
    ("planted", "expected"),
    [
        # a model that reaches up into a stage, inside a function: found all the same
        (
            {"models/chat.py": "def f():\n    from fake.tasks.stage import work\n"},
            "models/chat.py:2: fake.models.chat (fake.models, layer 0) imports fake.tasks.stage.work (fake.tasks, layer 1) upward",
        ),
        # a stage that imports a flow's name, only for type checking
        (
            {
                "tasks/stage/helpers.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake.flows.stage import x\n"
            },
            "tasks/stage/helpers.py:3: fake.tasks.stage.helpers (fake.tasks, layer 1) imports fake.flows.stage (fake.flows, layer 2) upward",
        ),
        # a relative import that climbs out of tasks into flows
        ({"tasks/stage/helpers.py": "from ...flows import stage\n"}, "imports fake.flows.stage (fake.flows, layer 2) upward"),
        # a side-effect import in a package's __init__
        (
            {"tasks/__init__.py": "import fake.flows.stage\n"},
            "tasks/__init__.py:1: fake.tasks (fake.tasks, layer 1) imports fake.flows.stage (fake.flows, layer 2) upward",
        ),
        # two modules of one layer that import each other
        (
            {"tasks/stage/helpers.py": "from fake.tasks.stage import work\n"},
            "import cycle among fake.tasks.stage.helpers, fake.tasks.stage.work",
        ),
        # Prefect in the plain functions of a stage
        (
            {"tasks/stage/work.py": "from prefect import task\n"},
            "tasks/stage/work.py:1: fake.tasks.stage.work imports prefect, which fake.tasks must not",
        ),
    ],
)
def test_the_checker_finds_a_planted_mistake(tmp_path, planted, expected):
    problems = layer_problems(_fake_package(tmp_path, {**CLEAN, **planted}), FAKE_LAYERS, {"fake.tasks": ("prefect",)})
    assert any(expected in p for p in problems), problems
