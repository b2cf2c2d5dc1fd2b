"""Where map-style work runs: threads here, a Dask or Ray cluster at scale (``orchestration``).

`task_runner_for(config.orchestration)` turns the config section into a Prefect task runner; a
flow that maps over items takes it with ``flow.with_options(task_runner=...)``. prefect-dask and
prefect-ray are optional extras (``pip install -e .[dask]`` / ``.[ray]``), imported only when
chosen, so the default install needs neither.

The simulation's unit of distributed work is a *shard* of personas, not one dialogue: a shard
task builds its own chat clients in the worker process (clients and loaded models do not travel
between processes), simulates its personas with the engine's own async concurrency, and appends
to its own shard file; the flow then merges the shards into ``dialogues.jsonl``. Shards are
chosen by a hash of the persona id, so a rerun with the same number of shards resumes each shard
where it stopped, and personas already merged are never simulated again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from esvr.flows.config import ModelConfig, OrchestrationConfig, PipelineConfig
    from esvr.tasks.simulate import SimulationSummary


class TaskRunnerError(RuntimeError):
    """A task runner that cannot be built here (usually: its extra is not installed)."""


def task_runner_for(orch: OrchestrationConfig) -> TaskRunner:
    """The Prefect task runner that ``orchestration.task_runner`` names.

    threads: a thread pool of ``max_workers`` (I/O-bound API calls overlap; one process).
    dask: ``address`` of a running scheduler (``tcp://host:8786``), or a local cluster of
        ``max_workers`` single-threaded worker processes.
    ray: ``address`` of a running Ray cluster (``ray://host:10001``), or a local one.
    """
    if orch.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=orch.max_workers)
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise TaskRunnerError(
                "orchestration.task_runner=dask needs prefect-dask: pip install -e '.[dask]'"
            ) from exc
        if orch.address:
            return DaskTaskRunner(address=orch.address)
        # Processes, one thread each: the simulation's own asyncio loop supplies the concurrency
        # inside a worker, and separate processes keep a model loaded per worker from fighting
        # over one GIL.
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": orch.max_workers, "threads_per_worker": 1, "processes": True,
                            "dashboard_address": None},
        )
    if orch.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise TaskRunnerError(
                "orchestration.task_runner=ray needs prefect-ray: pip install -e '.[ray]'"
            ) from exc
        if orch.address:
            return RayTaskRunner(address=orch.address)
        return RayTaskRunner(init_kwargs={"num_cpus": orch.max_workers})
    raise TaskRunnerError(f"orchestration.task_runner: unknown runner {orch.task_runner!r}")


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Simulation over a task runner
# --------------------------------------------------------------------------------------------


def _simulate_shard(config: PipelineConfig, personas: list[dict[str, Any]], shard_path: str,
                    roles: dict[str, ModelConfig | None]) -> SimulationSummary:
    from esvr.flows.runtime import chat_model
    from esvr.tasks.simulate import build_agents, simulate_dialogues

    out_dir = config.run.out_dir.resolve()
    models = {role: chat_model(cfg, out_dir, config.models.cache) for role, cfg in roles.items() if cfg is not None}
    scorer = None
    if config.simulate.emotion:
        from esvr.flows.simulate import emotion_scorer

        scorer = emotion_scorer(config)
    agents = build_agents(config.simulate, models["supporter"], models["seeker"], tvd_model=models.get("tvd"),
                          rg_model=models.get("rg"), emotion_scorer=scorer)
    return simulate_dialogues(personas, shard_path, agents, concurrency=config.simulate.concurrency,
                              alternatives=config.simulate.alternatives, seed=config.run.seed)


def _merge_shards(out: Path, shard_paths: Sequence[Path]) -> int:
    """Append the shard files' dialogues that `out` does not hold yet; returns how many."""
    from esvr.tasks.simulate import _append, exclusive, read_jsonl_repairing

    added = 0
    with exclusive(out):
        done = {rec["id"] for rec in read_jsonl_repairing(out)} if out.exists() else set()
        for path in shard_paths:
            if not path.exists():
                continue
            for rec in read_jsonl_repairing(path):
                if rec["id"] not in done:
                    _append(out, rec)
                    done.add(rec["id"])
                    added += 1
    return added


def simulate_on_runner(config: PipelineConfig, personas: list[dict[str, Any]], out: str | Path,
                       roles: dict[str, ModelConfig | None]) -> SimulationSummary:
    """Simulate `personas` into `out` as one task per shard on the flow's task runner.

    Call from inside a flow that runs with ``task_runner_for(config.orchestration)``. `roles` maps
    supporter/seeker/tvd/rg to model configs (None leaves one out). There are
    ``orchestration.max_workers`` shards; each keeps ``simulate.concurrency`` dialogues in flight.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from esvr.tasks.simulate import SimulationSummary, read_jsonl_repairing

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {rec["id"] for rec in read_jsonl_repairing(out)} if out.exists() else set()
    todo = [p for p in personas if str(p["id"]) not in done]
    summary = SimulationSummary(path=str(out), total=len(personas), skipped=len(personas) - len(todo))
    shards = split_shards(todo, config.orchestration.max_workers)
    sdir = shard_dir(out)
    sdir.mkdir(parents=True, exist_ok=True)
    paths = [sdir / f"shard-{shard_of(s[0]['id'], config.orchestration.max_workers):03d}.jsonl" for s in shards]
    # Not cached by Prefect: the shard files are the resumable record of what is done.
    shard_task = task(_simulate_shard, name="simulate-shard", cache_policy=NO_CACHE, persist_result=False)
    futures = [shard_task.submit(config, shard, str(path), roles) for shard, path in zip(shards, paths)]
    parts = [f.result() for f in futures]
    # written = appended to `out` now: this run's dialogues and any an interrupted run left in shards
    summary.written = _merge_shards(out, sorted(sdir.glob("shard-*.jsonl")))
    for part in parts:
        summary.errors += part.errors
        summary.elapsed_s = max(summary.elapsed_s, part.elapsed_s)
        summary.supporter_turns += part.supporter_turns
        summary.failed_turns += part.failed_turns
        summary.stepwise_turns += part.stepwise_turns
        summary.reasked_turns += part.reasked_turns
        summary.alternatives += part.alternatives
        for k, v in part.end_reasons.items():
            summary.end_reasons[k] = summary.end_reasons.get(k, 0) + v
        for k, v in part.calls.items():
            summary.calls[k] = summary.calls.get(k, 0) + v
    return summary
