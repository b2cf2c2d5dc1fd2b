"""Where map-style work runs: threads here, a Dask or Ray cluster at scale (``orchestration``).

`task_runner_for(config.orchestration)` turns the config section into a Prefect task runner;
`run_on_runner` opens it for one stage and runs one Prefect task per item on it, and `map_runner`
hands that to a stage as its `esvr.tasks.common.shards.MapRunner`. The stages that map over items
(labeling chunks, simulation shards, look-ahead rollout shards, the evaluation's supporters) take
this path whenever ``task_runner`` is not ``threads``; with threads they run in the flow's process
as before. prefect-dask and prefect-ray are optional extras (``pip install -e .[dask]`` /
``.[ray]``), imported only when chosen, so the default install needs neither.

An item's task builds what it needs in the worker process (clients and loaded models do not
travel between processes) from per-process caches (`esvr.tasks.common.roles.chat_model`,
`esvr.tasks.labeling.label.process_labelers`), so a worker loads a model once, not once per item;
each item's result names the worker's process id (``worker_pid``). Items write to files of their
own in the run folder, which the workers must share (a local cluster does; a remote one mounts it).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from esvr.flows.config import OrchestrationConfig
    from esvr.tasks.common.shards import MapRunner


class TaskRunnerError(RuntimeError):
    """A task runner that cannot be built here (usually: its extra is not installed)."""


#: the cluster runners, each from the optional extra of the same name: (module, class)
_CLUSTER_RUNNERS = {"dask": ("prefect_dask", "DaskTaskRunner"), "ray": ("prefect_ray", "RayTaskRunner")}


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
    if orch.task_runner not in _CLUSTER_RUNNERS:
        raise TaskRunnerError(f"orchestration.task_runner: unknown runner {orch.task_runner!r}")
    module, name = _CLUSTER_RUNNERS[orch.task_runner]
    try:
        runner = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        extra = orch.task_runner
        raise TaskRunnerError(
            f"orchestration.task_runner={extra} needs {module.replace('_', '-')}: pip install -e '.[{extra}]'"
        ) from exc
    if orch.address:
        return runner(address=orch.address)
    if orch.task_runner == "dask":
        # Processes, one thread each: the simulation's own asyncio loop supplies the concurrency
        # inside a worker, and separate processes keep a model loaded per worker from fighting
        # over one GIL.
        return runner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": orch.max_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
        )
    return runner(init_kwargs={"num_cpus": orch.max_workers})


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

    unit = task(name=name, cache_policy=NO_CACHE, persist_result=False)(fn)
    with shared_prefect_api(), task_runner_for(orch) as runner:
        try:
            futures = [runner.submit(unit, parameters=dict(kw)) for kw in calls]
        except OSError as exc:  # the first submission connects: a scheduler that does not answer
            if not orch.address:
                raise
            raise TaskRunnerError(
                f"orchestration.address {orch.address}: no {orch.task_runner} scheduler answers ({exc})"
            ) from None
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


def map_runner(orch: OrchestrationConfig) -> MapRunner:
    """`run_on_runner` on the runner `orch` names, as the callable a stage maps its items with."""
    return functools.partial(run_on_runner, orch)
