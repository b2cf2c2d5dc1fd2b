"""Content digests: a file or folder by its bytes, a config by its values, prompts by their wording.

Cache keys (``esvr.flows.caching``) and component fingerprints are built from these, so the same
dump at another path is the same input and a retrained adapter at the same path is a new one.
Digests are memoized per (path, size, mtime) so that a multi-GB dump is hashed once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from esvr.models.config import ModelConfig

_CHUNK = 1 << 22
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


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
    """A JSON-able stand-in for a task input: paths by content, configs by values, a
    `ModelConfig` naming local weights also by their content."""
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


def prompts_digest(names: list[str]) -> str:
    """Content digest of prompt files: a task whose output depends on wording keys on it."""
    from esvr.prompts import prompt_path

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        h.update(name.encode())
        h.update(prompt_path(name).read_bytes())
    return h.hexdigest()
