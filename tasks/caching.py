"""Cache keys for Prefect tasks that survive across runs and follow file contents.

Prefect's default policy also keys on the flow run id, so nothing is ever reused by a later run.
The project's policy keys on:

- the task's inputs, where a `pathlib.Path` counts by the *content* of the file or folder it names
  (the same dump at another path hits the cache, a new dump recomputes), a pydantic config
  section by its values, and a `ModelConfig` naming local weights also by their content (a
  retrained adapter at the same path invalidates what it generated);
- output locations by name, not content: parameters whose name starts with ``out`` (and
  ``run_dir``, the run folder) are keyed by their path string: their content is what the task is
  about to write, or everything else the run holds;
- the source code of the module that defines the task, of any module it names in ``code=``, and
  of every ``esvr.tasks`` / ``esvr.models`` module those import (at any depth, also inside
  functions): a fix in the code that does the work invalidates the cache, not just a change to
  the thin wrapper in a flow file.

Content digests are memoized per (path, size, mtime) so that a multi-GB dump is hashed once.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel

_CHUNK = 1 << 22
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()
_source_memo: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b of a file's bytes, memoized on (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    memo_key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if memo_key in _memo:
            return _memo[memo_key]
    h = hashlib.blake2b(digest_size=20)
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _memo_lock:
        _memo[memo_key] = digest
    return digest


def _derived(path: Path) -> bool:
    """Files a reader leaves in a folder it read: HF `datasets` writes ``cache-*.arrow`` next to a
    dataset it maps or filters. They are not part of the input, so they never change its digest."""
    return path.name.startswith("cache-") and path.suffix == ".arrow"


def path_digest(path: str | os.PathLike[str]) -> str:
    """Digest of a file, or of a folder's relative file names and contents (sorted)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        h = hashlib.blake2b(digest_size=20)
        for child in sorted(q for q in p.rglob("*") if q.is_file() and not _derived(q)):
            h.update(str(child.relative_to(p)).encode())
            h.update(file_digest(child).encode())
        return h.hexdigest()
    return f"missing:{p}"


def stable_form(value: Any) -> Any:
    """A JSON-able stand-in for a task input: paths by content, configs by values."""
    from esvr.flows.config import ModelConfig

    if isinstance(value, Path):
        return {"path_digest": path_digest(value)}
    if isinstance(value, ModelConfig):
        return {**value.model_dump(mode="json"), "weights": model_weights_digest(value.spec)}
    if isinstance(value, BaseModel):
        return {k: stable_form(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): stable_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable_form(v) for v in value]
    return value


def model_weights_digest(spec: str) -> str | None:
    """Content digest of the local folders an ``hf:`` spec names (None for remote models)."""
    if not spec.startswith("hf:"):
        return None
    parts = [p for p in spec[3:].split("+") if p]
    return "+".join(path_digest(p) if Path(p).exists() else p for p in parts)


#: packages whose modules do a task's work: their source is part of every cache key that uses them
DOMAIN_PACKAGES = ("esvr.tasks", "esvr.models")


def _module_source(module_name: str) -> tuple[str, str]:
    """The module's source as on disk now, and its digest (memoized on the file's size and mtime)."""
    path = Path(importlib.util.find_spec(module_name).origin)  # type: ignore[union-attr, arg-type]
    st = path.stat()
    memo_key = (f"source:{path}", st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if memo_key in _memo:
            return _source_memo[memo_key], _memo[memo_key]
    source = path.read_text()
    digest = hashlib.blake2b(source.encode(), digest_size=20).hexdigest()
    with _memo_lock:
        _memo[memo_key], _source_memo[memo_key] = digest, source
    return source, digest


def _project_imports(module_name: str, packages: tuple[str, ...] = DOMAIN_PACKAGES) -> set[str]:
    """Domain modules that `module_name` imports anywhere in its source (also inside functions)."""
    tree = ast.parse(_module_source(module_name)[0])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from esvr.tasks import label` imports a module, not a name
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith(packages) and _is_module(n)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `esvr.tasks.label.label_threads`: a name inside a module
        return False


def work_modules(*roots: str, packages: tuple[str, ...] = DOMAIN_PACKAGES) -> list[str]:
    """`roots` and every module of `packages` they reach through imports, sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_project_imports(name, packages) - seen)
    return sorted(seen)


def _module_source_digest(module_name: str) -> str:
    return _module_source(module_name)[1]


@dataclass
class FileAwareInputs(CachePolicy):
    """INPUTS + TASK_SOURCE, with files by content and the defining modules' source included."""

    code: tuple[str, ...] = ()
    exclude: list[str] = field(default_factory=list)
    packages: tuple[str, ...] = DOMAIN_PACKAGES

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
            "code": {m: _module_source_digest(m) for m in work_modules(fn.__module__, *self.code, packages=self.packages)},
            "inputs": {
                k: (str(v) if k.startswith("out") or k == "run_dir" else stable_form(v))
                for k, v in (inputs or {}).items()
                if k not in self.exclude
            },
        }
        return hash_objects(json.dumps(payload, sort_keys=True, default=str), raise_on_failure=True)


def cache_policy(
    *code: str, exclude: list[str] | None = None, packages: tuple[str, ...] = DOMAIN_PACKAGES
) -> FileAwareInputs:
    """The project's policy. ``code`` names extra modules whose source the result depends on."""
    return FileAwareInputs(code=tuple(code), exclude=list(exclude or []), packages=packages)
