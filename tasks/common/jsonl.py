"""JSON Lines files, the pipeline's record format: written whole, appended, read back.

Whole files (`write_jsonl`) are written beside the target and renamed into place, so a reader
never sees half a file. Append-only files (dialogues, rollouts) take one `append_jsonl` per
finished record under one writer (`exclusive`), and `read_jsonl_repairing` cuts off the torn last
line an interrupted run may leave, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from esvr.models.config import InputFileError
from esvr.tasks.common.locks import held_lock

log = logging.getLogger(__name__)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write `records` as `path`, atomically; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    tmp.replace(path)
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a JSONL file; blank lines are skipped, a broken line is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file {path}")
    out = []
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise InputFileError(f"{path}: line {i} is not valid JSON ({exc})") from None
    return out


def read_jsonl_repairing(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records = []
    good_end = 0
    pos = 0
    for line in data.splitlines(keepends=True):
        end = pos + len(line)
        if line.endswith(b"\n"):
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise InputFileError(f"{path}: line {len(records) + 1} is not valid JSON ({exc}); the file is damaged") from None
            good_end = end
        pos = end
    if good_end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record and flush it to disk: a finished record survives a crash."""
    line = orjson.dumps(record) + b"\n"
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One writer per appended file: a second simulation on the same file is an error, not a race."""
    lock_path = path.with_name(path.name + ".lock")
    with held_lock(lock_path, busy=f"{path} is being written by another simulation (lock {lock_path})"):
        yield
