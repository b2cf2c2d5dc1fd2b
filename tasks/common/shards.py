"""Map-style work split into shards, and the runner a flow hands in to run them.

A stage that maps over many items (labeling chunks, simulation personas, look-ahead rollouts, the
evaluation's supporters) gets a `MapRunner` from its flow: ``run(fn, calls, name=...)`` calls
``fn(**kwargs)`` once per kwargs of `calls`, possibly in other processes (a Dask or Ray cluster),
and returns the results in order. The stage never knows how; the flow builds the runner from
``orchestration`` (``esvr.flows.task_runners``). `fn` must be a module's function and its
arguments picklable.

The unit of distributed work of the appended files (dialogues, rollouts) is a *shard*: items are
grouped by a hash of their id, each shard appends to its own file, and the flow then merges the
shards. A rerun with the same number of shards resumes each shard where it stopped, and records
already merged are never produced again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from esvr.tasks.common.jsonl import append_jsonl, exclusive, read_jsonl_repairing

T = TypeVar("T")


class MapRunner(Protocol):
    def __call__(self, fn: Callable[..., T], calls: Sequence[Mapping[str, Any]], *, name: str) -> list[T]: ...


def shard_of(item_id: str, n_shards: int) -> int:
    """A stable shard number for an id (not Python's salted hash: it must agree across runs)."""
    return int(hashlib.sha1(str(item_id).encode()).hexdigest()[:8], 16) % max(1, n_shards)


def split_shards(items: Sequence[dict[str, Any]], n_shards: int, key: str = "id") -> list[list[dict[str, Any]]]:
    """Items grouped by `shard_of(item[key])`; empty shards are dropped."""
    shards: list[list[dict[str, Any]]] = [[] for _ in range(max(1, n_shards))]
    for item in items:
        shards[shard_of(item[key], len(shards))].append(item)
    return [s for s in shards if s]


def shard_dir(out: Path) -> Path:
    return out.parent / f"{out.stem}.shards"


def shard_paths(shards: Sequence[Sequence[dict[str, Any]]], out: Path, n_shards: int, key: str = "id") -> list[Path]:
    """One file per shard in `shard_dir(out)`, named by the shard number, so a rerun finds it."""
    sdir = shard_dir(out)
    sdir.mkdir(parents=True, exist_ok=True)
    return [sdir / f"shard-{shard_of(s[0][key], n_shards):03d}.jsonl" for s in shards]


def merge_shards(out: Path, shard_files: Sequence[Path], key: str = "id") -> int:
    """Append the shard files' records whose `key` `out` does not hold yet; returns how many."""
    added = 0
    with exclusive(out):
        done = {rec[key] for rec in read_jsonl_repairing(out)} if out.exists() else set()
        for path in shard_files:
            if not path.exists():
                continue
            for rec in read_jsonl_repairing(path):
                if rec[key] not in done:
                    append_jsonl(out, rec)
                    done.add(rec[key])
                    added += 1
    return added


def merge_shard_runs(
    out: Path, runs: Sequence[Mapping[str, Any]], figures: Callable[[Mapping[str, Any]], Mapping[str, Any]], key: str = "id"
) -> int:
    """After a runner's shard tasks: every shard file merged into `out`, and what each task did
    written to ``shards.json``: its shard, `figures(run)` and its worker's process id (``shard``
    and ``worker_pid`` of each run). Returns how many records merging appended: this run's, and
    any that an interrupted run left in the shards."""
    added = merge_shards(out, sorted(shard_dir(out).glob("shard-*.jsonl")), key=key)
    write_shard_runs(out, [{"shard": r["shard"], **figures(r), "worker_pid": r["worker_pid"]} for r in runs])
    return added


def write_shard_runs(out: Path, runs: Sequence[Mapping[str, Any]]) -> Path:
    """``shards.json`` next to the shard files: what each shard task of the last run did, and where."""
    path = shard_dir(out) / "shards.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(runs), indent=2) + "\n")
    return path


def shard_runs(out: Path) -> list[dict[str, Any]]:
    """What `write_shard_runs` recorded for `out` ([] when nothing ran on a cluster)."""
    path = shard_dir(Path(out)) / "shards.json"
    return json.loads(path.read_text()) if path.exists() else []
