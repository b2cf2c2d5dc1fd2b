"""The README and docs name only what exists: modules, files, pages and their sections.

A module is named as `esvr.tasks.x.y` (an attribute may follow: `esvr.tasks.tvd.TVDMethod`); a
file of the repository as `tasks/x/y.py`, `configs/demo.yaml`, `prompts/rg/user.txt` ... Links
between the pages (`[text](page.md#section)`) must reach a page and a heading. The README's layout
section must list every top-level folder of the repository, every stage subpackage of `tasks/` and
every recipe under `configs/`.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: the package's import names and the folders they install from (pyproject.toml's package-dir)
PACKAGE_DIRS = {"esvr": "esvr", "esvr.flows": "flows", "esvr.tasks": "tasks", "esvr.models": "models", "esvr.prompts": "prompts"}
#: the repository's own top-level folders, as pages write their paths
REPO_FOLDERS = ("flows", "tasks", "models", "prompts", "configs", "tests", "infra", "docs", "esvr", ".ci")

# `esvr.crisis`, `esvr.run_name` ... are logger and MLflow tag names, not modules.
MODULE_RE = re.compile(r"(?<![\w./-])esvr\.(?:flows|tasks|models|prompts)(?:\.\w+)*")
# A repository path starts a token (not `~/.cache/esvr/models/`, not `<run>/evaluate/`) and has
# no placeholder in it (`tasks/<stage>.py`, `prompts/x_{a,b}.txt`).
_FOLDERS = "|".join(re.escape(f) for f in REPO_FOLDERS)
PATH_RE = re.compile(rf"(?<![\w./~<>-])(?:{_FOLDERS})/[\w./-]*(?![\w./{{<*-])")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def _names_defined(path: Path) -> set[str]:
    """Top-level names of a module: functions, classes, assignments and imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def module_problem(dotted: str) -> str | None:
    """Why `dotted` names no module (or no module attribute) of the package; None when it does."""
    parts = dotted.split(".")
    top = ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in PACKAGE_DIRS else "esvr"
    folder = ROOT / PACKAGE_DIRS[top]
    rest = parts[len(top.split(".")) :]
    while rest and (folder / rest[0] / "__init__.py").is_file():
        folder, rest = folder / rest[0], rest[1:]
    if rest and (folder / f"{rest[0]}.py").is_file():
        module, rest = folder / f"{rest[0]}.py", rest[1:]
    else:
        module = folder / "__init__.py"
    if not rest:
        return None
    if rest[0] not in _names_defined(module):
        return f"{module.relative_to(ROOT)} has no module or name {rest[0]!r}"
    return None


def path_problem(token: str) -> str | None:
    path = token.split("::")[0].rstrip(".,:;")
    if (ROOT / path).exists():
        return None
    return f"no file or folder {path}"


@cache
def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return slugs


def link_problem(page: Path, target: str) -> str | None:
    if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
        return None
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
        return f"link to a missing file {file}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"link to a missing section {target}"
    return None


def problems(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    found = [(m, module_problem(m)) for m in MODULE_RE.findall(text)]
    found += [(m, path_problem(m)) for m in PATH_RE.findall(text)]
    found += [(m, link_problem(page, m)) for m in LINK_RE.findall(text)]
    return sorted({f"{page.relative_to(ROOT)}: {name}: {why}" for name, why in found if why})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_path_and_link_a_page_names_exists(page: Path):
    assert problems(page) == []


def test_the_check_catches_what_does_not_exist(tmp_path: Path):
    assert module_problem("esvr.flows.cli") is None
    assert module_problem("esvr.flows.cli.main") is None
    assert module_problem("esvr.flows.no_such_module") is not None
    assert module_problem("esvr.flows.cli.no_such_name") is not None
    assert path_problem("flows/cli.py") is None
    assert path_problem("tasks/no_such_stage/tasks.py") is not None
    assert PATH_RE.findall("`~/.cache/esvr/models/`, `<run>/evaluate/`, `tasks/<stage>.py`, `prompts/x_{a,b}.txt`") == []
    assert MODULE_RE.findall("tags `esvr.run_name`, logger `esvr.crisis`, `esvr.flows.cli:main`") == ["esvr.flows.cli"]
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n## Its section (`x`)\n", encoding="utf-8")
    assert link_problem(page, "#its-section-x") is None
    assert link_problem(page, "#no-section") is not None
    assert link_problem(page, "missing.md") is not None


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_layout_lists_every_top_level_folder_stage_subpackage_and_recipe():
    layout = _layout_block()
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked top-level folders are unknown")
    folders = {path.split("/")[0] for path in tracked if "/" in path}
    missing = sorted(f for f in folders if not re.search(rf"(?m)^{re.escape(f)}/", layout))
    assert missing == [], f"README layout lacks {missing}"
    stages = sorted(f"tasks/{p.parent.name}/" for p in (ROOT / "tasks").glob("*/__init__.py"))
    assert [s for s in stages if not re.search(rf"(?m)^{re.escape(s)}", layout)] == []
    recipes = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert [r for r in recipes if r not in layout] == []
    for entry in re.findall(r"(?m)^(\S+)", layout):
        assert (ROOT / entry).exists(), f"README layout names {entry}, which does not exist"
