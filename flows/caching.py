"""Cache keys for Prefect tasks that survive across runs and follow file contents.

Prefect's default policy also keys on the flow run id, so nothing is ever reused by a later run.
The project's policy keys on:

- the task's inputs, where a `pathlib.Path` counts by the *content* of the file or folder it names
  (the same dump at another path hits the cache, a new dump recomputes), a pydantic config
  section by its values, and a `ModelConfig` naming local weights also by their content (a
  retrained adapter at the same path invalidates what it generated): `esvr.tasks.common.hashing`;
- output locations by name, not content: parameters whose name starts with ``out`` (and
  ``run_dir``, the run folder) are keyed by their path string: their content is what the task is
  about to write, or everything else the run holds;
- the source code of the module that defines the task's function, of the stage subpackages and
  modules it names in ``code=`` (a package counts with every module in it), and of every
  ``esvr.tasks`` / ``esvr.models`` module those import (at any depth, also inside functions): a
  fix in the code that does the work invalidates the cache, not just a change to a task wrapper;
- the content of the prompt files named in ``prompts=``: new wording, new result.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import pkgutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from esvr.tasks.common.hashing import prompts_digest, stable_form

#: packages whose modules do a task's work: their source is part of every cache key that uses them
DOMAIN_PACKAGES = ("esvr.tasks", "esvr.models")

_memo: dict[tuple[str, int, int], tuple[str, str]] = {}
_memo_lock = threading.Lock()


def _module_source(module_name: str) -> tuple[str, str]:
    """The module's source as on disk now, and its digest (memoized on the file's size and mtime)."""
    path = Path(importlib.util.find_spec(module_name).origin)  # type: ignore[union-attr, arg-type]
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if memo_key in _memo:
            return _memo[memo_key]
    source = path.read_text()
    digest = hashlib.blake2b(source.encode(), digest_size=20).hexdigest()
    with _memo_lock:
        _memo[memo_key] = (source, digest)
    return source, digest


_imports_memo: dict[tuple[str, str, tuple[str, ...]], frozenset[str]] = {}


def _project_imports(module_name: str, packages: tuple[str, ...] = DOMAIN_PACKAGES) -> frozenset[str]:
    """Domain modules that `module_name` imports anywhere in its source (also inside functions);
    memoized on the source's digest: a cache key walks ~25 modules, and a cached run computes ~30
    keys (parsing them all each time cost a cached demo ~10 s)."""
    source, digest = _module_source(module_name)
    memo_key = (module_name, digest, packages)
    with _memo_lock:
        if memo_key in _imports_memo:
            return _imports_memo[memo_key]
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from esvr.tasks.components import tvd` imports a module, not a name
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = frozenset(n for n in names if n.startswith(packages) and _is_module(n))
    with _memo_lock:
        _imports_memo[memo_key] = found
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `esvr.tasks.labeling.label.label_threads`: a name inside a module
        return False


def _with_submodules(name: str) -> list[str]:
    """`name`, and every module below it when it is a package (a whole stage subpackage)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return [name]
    return [name, *(m.name for m in pkgutil.walk_packages(spec.submodule_search_locations, prefix=f"{name}."))]


def work_modules(*roots: str, packages: tuple[str, ...] = DOMAIN_PACKAGES) -> list[str]:
    """`roots` (packages with all their modules) and every module of `packages` they reach
    through imports, sorted."""
    seen: set[str] = set()
    todo = [m for root in roots for m in _with_submodules(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_project_imports(name, packages) - seen)
    return sorted(seen)


@dataclass
class FileAwareInputs(CachePolicy):
    """INPUTS + TASK_SOURCE, with files by content and the defining modules' source included."""

    code: tuple[str, ...] = ()
    exclude: list[str] = field(default_factory=list)
    packages: tuple[str, ...] = DOMAIN_PACKAGES
    prompts: tuple[str, ...] = ()

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        fn = task_ctx.task.fn
        payload = {
            "task": f"{fn.__module__}.{fn.__qualname__}",
            "code": {m: _module_source(m)[1] for m in work_modules(fn.__module__, *self.code, packages=self.packages)},
            "inputs": {
                k: (str(v) if k.startswith("out") or k == "run_dir" else stable_form(v))
                for k, v in (inputs or {}).items()
                if k not in self.exclude
            },
            "prompts": prompts_digest(list(self.prompts)) if self.prompts else None,
        }
        return hash_objects(json.dumps(payload, sort_keys=True, default=str), raise_on_failure=True)


def cache_policy(
    *code: str,
    exclude: list[str] | None = None,
    packages: tuple[str, ...] = DOMAIN_PACKAGES,
    prompts: Sequence[str] = (),
) -> FileAwareInputs:
    """The project's policy. ``code`` names the stage subpackages and extra modules whose source
    the result depends on, ``prompts`` the prompt files (relative to prompts/) whose wording it
    depends on; ``exclude`` names inputs that do not change the result."""
    return FileAwareInputs(code=tuple(code), exclude=list(exclude or []), packages=packages, prompts=tuple(prompts))
