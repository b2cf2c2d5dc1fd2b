"""Where map-style work runs: threads here, a Dask or Ray cluster at scale (``orchestration``).

`task_runner_for(config.orchestration)` turns the config section into a Prefect task runner;
`run_on_runner` opens it for one stage and runs one Prefect task per item on it. The stages that
map over items (labeling chunks, simulation shards, look-ahead rollout shards, the evaluation's
supporters) take this path whenever ``task_runner`` is not ``threads``; with threads they run in
the flow's process as before. prefect-dask and prefect-ray are optional extras
(``pip install -e .[dask]`` / ``.[ray]``), imported only when chosen, so the default install
needs neither.

An item's task builds what it needs in the worker process (clients and loaded models do not
travel between processes) from per-process caches (`esvr.flows.runtime.chat_model`,
`esvr.tasks.label.process_labelers`), so a worker loads a model once, not once per item; each
item's result names the worker's process id (``worker_pid``). Items write to files of their own
in the run folder, which the workers must share (a local cluster does; a remote one mounts it).

The simulation's unit of distributed work is a *shard* of personas, not one dialogue: a shard
task simulates its personas with the engine's own async concurrency and appends to its own shard
file; the flow then merges the shards into ``dialogues.jsonl``. Shards are chosen by a hash of
the persona id, so a rerun with the same number of shards resumes each shard where it stopped,
and personas already merged are never simulated again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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


T = TypeVar("T")


def run_on_runner(orch: OrchestrationConfig, fn: Callable[..., T], calls: Sequence[Mapping[str, Any]], *, name: str) -> list[T]:
    """``fn(**kwargs)`` for every kwargs of `calls`, one Prefect task each on the runner `orch`
    names; the results in the order of `calls`.

    The runner is opened here, for this stage only: a local Dask cluster starts and stops with it,
    an ``address`` is joined and left running. `fn` must be importable by the workers (a module's
    function) and its arguments picklable. Not cached by Prefect: the items' own files are the
    resumable record of what is done.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    unit = task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)
    with shared_prefect_api(), task_runner_for(orch) as runner:
        try:
            futures = [runner.submit(unit, parameters=dict(kw)) for kw in calls]
        except OSError as exc:  # the first submission connects: a scheduler that does not answer
            if not orch.address:
                raise
            raise TaskRunnerError(f"orchestration.address {orch.address}: no {orch.task_runner} scheduler answers ({exc})") from None
        return [f.result() for f in futures]


@contextmanager
def shared_prefect_api() -> Iterator[None]:
    """Worker processes started inside this block report to this process's Prefect API.

    With no ``PREFECT_API_URL`` the flow runs on Prefect's temporary server; a local cluster's
    workers, inheriting no URL, would each start a temporary server of their own (~10 s and
    ~250 MB each) and report their task runs there, out of the flow run's sight.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    os.environ["PREFECT_API_URL"] = str(get_client(sync_client=True).api_url)
    try:
        yield
    finally:  # the temporary server goes when this process's flows end: no stale URL left behind
        os.environ.pop("PREFECT_API_URL", None)


def uses_cluster(orch: OrchestrationConfig) -> bool:
    """Whether a stage's items go to `run_on_runner` (threads: the flow's process, as always)."""
    return orch.task_runner != "threads"


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


def shard_paths(shards: Sequence[Sequence[dict[str, Any]]], out: Path, n_shards: int, key: str = "id") -> list[Path]:
    """One file per shard in `shard_dir(out)`, named by the shard number, so a rerun finds it."""
    sdir = shard_dir(out)
    sdir.mkdir(parents=True, exist_ok=True)
    return [sdir / f"shard-{shard_of(s[0][key], n_shards):03d}.jsonl" for s in shards]


def merge_shards(out: Path, shard_files: Sequence[Path], key: str = "id") -> int:
    """Append the shard files' records whose `key` `out` does not hold yet; returns how many."""
    from esvr.tasks.simulate import _append, exclusive, read_jsonl_repairing

    added = 0
    with exclusive(out):
        done = {rec[key] for rec in read_jsonl_repairing(out)} if out.exists() else set()
        for path in shard_files:
            if not path.exists():
                continue
            for rec in read_jsonl_repairing(path):
                if rec[key] not in done:
                    _append(out, rec)
                    done.add(rec[key])
                    added += 1
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


# --------------------------------------------------------------------------------------------
# Simulation over a task runner
# --------------------------------------------------------------------------------------------


def simulate_shard(config: PipelineConfig, personas: list[dict[str, Any]], shard_path: str,
                   roles: dict[str, ModelConfig | None]) -> dict[str, Any]:
    """One shard's dialogues in this (worker) process; returns its summary and ``worker_pid``."""
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
    summary = simulate_dialogues(personas, shard_path, agents, concurrency=config.simulate.concurrency,
                                 alternatives=config.simulate.alternatives, seed=config.run.seed)
    return {"shard": Path(shard_path).name, "personas": len(personas), "worker_pid": os.getpid(), "summary": summary}


def simulate_on_runner(config: PipelineConfig, personas: list[dict[str, Any]], out: str | Path,
                       roles: dict[str, ModelConfig | None]) -> SimulationSummary:
    """Simulate `personas` into `out` as one task per shard on the runner ``orchestration`` names.

    `roles` maps supporter/seeker/tvd/rg to model configs (None leaves one out). There are
    ``orchestration.max_workers`` shards; each keeps ``simulate.concurrency`` dialogues in flight.
    What each shard did, with its worker's process id, goes to ``<out>.shards/shards.json``.
    """
    from esvr.tasks.simulate import SimulationSummary, read_jsonl_repairing

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {rec["id"] for rec in read_jsonl_repairing(out)} if out.exists() else set()
    todo = [p for p in personas if str(p["id"]) not in done]
    summary = SimulationSummary(path=str(out), total=len(personas), skipped=len(personas) - len(todo))
    n = config.orchestration.max_workers
    shards = split_shards(todo, n)
    calls = [{"config": config, "personas": shard, "shard_path": str(path), "roles": roles}
             for shard, path in zip(shards, shard_paths(shards, out, n))]
    runs = run_on_runner(config.orchestration, simulate_shard, calls, name="simulate-shard") if calls else []
    # written = appended to `out` now: this run's dialogues and any an interrupted run left in shards
    summary.written = merge_shards(out, sorted(shard_dir(out).glob("shard-*.jsonl")))
    for run in runs:
        part = run["summary"]
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
    write_shard_runs(out, [{"shard": r["shard"], "personas": r["personas"], "written": r["summary"].written,
                            "errors": len(r["summary"].errors), "elapsed_s": r["summary"].elapsed_s,
                            "worker_pid": r["worker_pid"]} for r in runs])
    return summary
