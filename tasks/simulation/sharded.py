"""The simulation on a task runner: personas in shards, one task per shard, merged into one file.

A shard task simulates its personas with the engine's own async concurrency and appends to its own
shard file; the shards are then merged into ``dialogues.jsonl``. Shards are chosen by a hash of
the persona id (`esvr.tasks.common.shards`), so a rerun with the same number of shards resumes
each shard where it stopped, and personas already merged are never simulated again. Before that,
one task opens the agents on the runner (where the models live) to learn the models and settings
of this run: the merged file and shard files made under others are moved aside, as the engine does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esvr.models.config import ModelConfig
from esvr.models.emotion import EmotionConfig
from esvr.tasks.common.jsonl import read_jsonl_repairing
from esvr.tasks.common.shards import MapRunner, merge_shards, shard_dir, shard_paths, split_shards, write_shard_runs
from esvr.tasks.simulation.simulate import (
    SimulateConfig,
    SimulationSummary,
    move_aside,
    opened_agents,
    run_settings,
    simulate_dialogues,
    stale_reasons,
)


@dataclass(frozen=True)
class ShardSetup:
    """What every shard task needs to open the agents where it runs (picklable: it travels to the
    runner's workers). `roles` maps supporter/seeker/tvd/rg to model configs; None leaves one out."""

    simulate: SimulateConfig
    roles: dict[str, ModelConfig | None]
    emotion: EmotionConfig | None
    run_dir: str
    use_cache: bool

    def opened(self) -> Any:
        return opened_agents(
            self.simulate,
            self.roles["supporter"],  # type: ignore[arg-type]  # supporter and seeker are always given
            self.roles["seeker"],  # type: ignore[arg-type]
            tvd=self.roles.get("tvd"),
            rg=self.roles.get("rg"),
            emotion=self.emotion,
            run_dir=self.run_dir,
            use_cache=self.use_cache,
        )


def simulation_identity(setup: ShardSetup, seed: int) -> dict[str, Any]:
    """The models (``names``) and ``settings`` this run's dialogues record, from a worker."""
    with setup.opened() as agents:
        return {"names": agents.names, "settings": run_settings(agents, alternatives=setup.simulate.alternatives, seed=seed)}


def _shard_files(out: Path) -> list[Path]:
    """The shard files to merge: not the ones moved aside."""
    return sorted(p for p in shard_dir(out).glob("shard-*.jsonl") if ".stale-" not in p.name)


def simulate_shard(setup: ShardSetup, personas: list[dict[str, Any]], shard_path: str, seed: int) -> dict[str, Any]:
    """One shard's dialogues in this (worker) process; returns its summary and ``worker_pid``."""
    cfg = setup.simulate
    with setup.opened() as agents:
        summary = simulate_dialogues(
            personas, shard_path, agents, concurrency=cfg.concurrency, alternatives=cfg.alternatives, seed=seed
        )
    return {"shard": Path(shard_path).name, "personas": len(personas), "worker_pid": os.getpid(), "summary": summary}


def simulate_on_runner(
    run: MapRunner,
    n_shards: int,
    setup: ShardSetup,
    personas: list[dict[str, Any]],
    out: str | Path,
    seed: int,
) -> SimulationSummary:
    """Simulate `personas` into `out` as one task per shard of `n_shards`, mapped with `run`.

    Each shard keeps ``simulate.concurrency`` dialogues in flight. What each shard did, with its worker's process
    id, goes to ``<out>.shards/shards.json``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (identity,) = run(simulation_identity, [{"setup": setup, "seed": seed}], name="simulate-identity")
    for path in [out, *_shard_files(out)]:
        changed = stale_reasons(read_jsonl_repairing(path), identity["names"], identity["settings"])
        if changed:
            move_aside(path, changed)
    done = {rec["id"] for rec in read_jsonl_repairing(out)} if out.exists() else set()
    todo = [p for p in personas if str(p["id"]) not in done]
    summary = SimulationSummary(path=str(out), total=len(personas), skipped=len(personas) - len(todo))
    shards = split_shards(todo, n_shards)
    calls = [
        {"setup": setup, "personas": shard, "shard_path": str(path), "seed": seed}
        for shard, path in zip(shards, shard_paths(shards, out, n_shards))
    ]
    runs = run(simulate_shard, calls, name="simulate-shard") if calls else []
    # written = appended to `out` now: this run's dialogues and any an interrupted run left in shards
    summary.written = merge_shards(out, _shard_files(out))
    for shard_run in runs:
        summary.add(shard_run["summary"])
    write_shard_runs(
        out,
        [
            {
                "shard": r["shard"],
                "personas": r["personas"],
                "written": r["summary"].written,
                "errors": len(r["summary"].errors),
                "elapsed_s": r["summary"].elapsed_s,
                "worker_pid": r["worker_pid"],
            }
            for r in runs
        ],
    )
    return summary
