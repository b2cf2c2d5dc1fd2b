"""The task runner is a config choice; the simulation runs on a local Dask cluster of 2 workers.

Real Prefect (the session harness), a real `distributed.LocalCluster` with two worker processes,
and the scripted OpenAI-compatible server on 127.0.0.1 that the simulate bench uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esvr.flows.config import ModelConfig, OrchestrationConfig, PipelineConfig
from esvr.flows.task_runners import TaskRunnerError, shard_of, split_shards, task_runner_for


def test_threads_is_the_default_runner():
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = task_runner_for(OrchestrationConfig())
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert runner._max_workers == 2


def test_dask_runner_local_cluster_or_address():
    prefect_dask = pytest.importorskip("prefect_dask")
    local = task_runner_for(OrchestrationConfig(task_runner="dask", max_workers=3))
    assert isinstance(local, prefect_dask.DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    remote = task_runner_for(OrchestrationConfig(task_runner="dask", address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786"


def test_ray_runner_without_the_extra_names_the_fix():
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(TaskRunnerError, match=r"pip install -e '\.\[ray\]'"):
            task_runner_for(OrchestrationConfig(task_runner="ray"))
    else:
        assert type(task_runner_for(OrchestrationConfig(task_runner="ray"))).__name__ == "RayTaskRunner"


def test_shards_are_stable_and_cover_every_item():
    items = [{"id": f"p{i}"} for i in range(50)]
    shards = split_shards(items, 4)
    assert sorted(i["id"] for s in shards for i in s) == sorted(i["id"] for i in items)
    assert split_shards(list(reversed(items)), 4) != [] and all(
        shard_of(i["id"], 4) == shard_of(s[0]["id"], 4) for s in shards for i in s
    )
    assert shard_of("p1", 4) == shard_of("p1", 4)  # not Python's per-process salted hash


@pytest.mark.slow
def test_simulation_on_a_local_dask_cluster_of_two_workers(prefect_harness, tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    from prefect import flow, task

    from esvr.flows.task_runners import simulate_on_runner
    from esvr.tasks.sim_bench import FakeOpenAIServer, Script, bench_personas
    from esvr.tasks.simulate import load_dialogues

    # The worker processes inherit the environment: the fake server ignores the key's value.
    monkeypatch.setenv("ESVR_TEST_KEY", "unused")

    @task
    def where() -> int:
        return os.getpid()

    @flow
    def simulate_here(config: PipelineConfig, personas: list[dict], out: str, roles: dict) -> tuple:
        pids = {f.result() for f in [where.submit() for _ in range(4)]}
        return simulate_on_runner(config, personas, out, roles), pids

    from distributed import Client, LocalCluster

    # One cluster for both runs (the runner's `address` path); the task runner's own local cluster
    # is the same LocalCluster class (test_dask_runner_local_cluster_or_address).
    with FakeOpenAIServer(Script(end_after=2)) as server, LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        def model(role: str) -> ModelConfig:
            return ModelConfig(spec=f"openai:fake-{role}", base_url=server.base_url, api_key_env="ESVR_TEST_KEY", max_retries=1)

        config = PipelineConfig.model_validate({
            "run": {"out_dir": str(tmp_path / "run")},
            "orchestration": {"task_runner": "dask", "max_workers": 2, "address": cluster.scheduler_address},
            "simulate": {"emotion": False, "concurrency": 4},
        })
        roles = {"supporter": model("supporter"), "seeker": model("seeker"), "tvd": model("tvd"), "rg": model("rg")}
        personas = bench_personas(6)
        out = tmp_path / "run" / "simulate" / "main" / "dialogues.jsonl"
        summary, pids = simulate_here.with_options(task_runner=task_runner_for(config.orchestration))(
            config, personas, str(out), roles
        )

        assert os.getpid() not in pids, "tasks ran in the flow's process, not on the Dask workers"
        with Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2 and pids <= worker_pids, (pids, worker_pids)
        assert summary.written == 6 and not summary.errors, summary.errors
        dialogues = load_dialogues(out)
        assert sorted(d["id"] for d in dialogues) == sorted(p["id"] for p in personas)
        assert all(d["end_reason"] for d in dialogues)
        shards = sorted(p.name for p in (out.parent / "dialogues.shards").glob("shard-*.jsonl"))
        assert len(shards) == 2, shards

        # A rerun finds every persona merged: nothing is simulated again, no call reaches the server.
        calls = server.script.calls
        again, _ = simulate_here.with_options(task_runner=task_runner_for(config.orchestration))(
            config, personas, str(out), roles
        )
        assert again.skipped == 6 and again.written == 0
        assert server.script.calls == calls
        assert len(load_dialogues(out)) == 6
