"""The task runner is a config choice: labeling chunks, simulation shards, look-ahead rollout
shards and the evaluation's supporters run on a Dask cluster of two worker processes, with the
same outputs as the threads runner.

Real Prefect (the session harness), real `distributed` clusters (the runner's own local cluster,
and one joined by ``address``), the offline labelers, and scripted OpenAI-compatible servers on
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from esvr.flows.config import OrchestrationConfig, PipelineConfig
from esvr.flows.task_runners import TaskRunnerError, map_runner, task_runner_for
from esvr.models.config import ModelConfig
from esvr.tasks.common.shards import shard_of, split_shards


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


def test_a_scheduler_that_does_not_answer_is_named():
    pytest.importorskip("prefect_dask")
    import socket

    import dask

    from esvr.flows.task_runners import run_on_runner

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(TaskRunnerError, match=rf"orchestration.address {address}: no dask scheduler answers"),
    ):
        run_on_runner(
            OrchestrationConfig(task_runner="dask", address=address), shard_of, [{"item_id": "a", "n_shards": 2}], name="x"
        )


def _pids(records: list[dict]) -> set[int]:
    return {r["worker_pid"] for r in records}


def _without_timings(value):
    """A record with its wall-clock fields dropped: they differ between any two runs."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "elapsed_s"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_label_flow_on_a_local_dask_cluster_of_two_workers(prefect_harness, tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    import numpy as np
    from test_label_flow import write_threads

    from esvr.flows.config import load_config
    from esvr.flows.label import label_flow
    from esvr.tasks.labeling.label import read_labels

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = write_threads(tmp_path / "threads.parquet", n_threads=24)  # 53 utterances: 14 chunks of 4

    def config(name: str, *orchestration: str):
        return load_config(
            None,
            [
                f"run.out_dir={tmp_path / name}",
                "run.experiment=label-dask",
                "label.progress=false",
                "label.chunk_size=4",
                *orchestration,
            ],
        )

    base = label_flow(config("threads"), threads)
    base_chunks = sorted((tmp_path / "threads" / "label" / "chunks").glob("*.parquet"))
    assert len(base_chunks) == 14
    # half the chunks are already done (an interrupted run): the cluster reuses them
    done = tmp_path / "dask" / "label" / "chunks"
    done.mkdir(parents=True)
    for path in base_chunks[:7]:
        shutil.copy(path, done / path.name)

    result = label_flow(config("dask", "orchestration.task_runner=dask", "orchestration.max_workers=2"), threads)

    chunks = json.loads((tmp_path / "dask" / "label" / "label_chunks.json").read_text())
    assert len(chunks) == 7  # only the utterances the store lacked were sent to the workers
    pids = _pids(chunks)
    assert len(pids) >= 2 and os.getpid() not in pids, pids
    stats = json.loads(Path(result["label_stats"]).read_text())
    assert stats["workers"] == len(pids) and stats["utterances"] == 53
    assert stats["new_utterances"] == sum(c["utterances"] for c in chunks) == 53 - stats["cached_utterances"]
    # the same chunk files, and the same labels as the threads runner
    assert sorted(p.name for p in done.glob("*.parquet")) == [p.name for p in base_chunks]
    expected, got = read_labels(base["labels"]), read_labels(result["labels"])
    assert got["utt_id"].to_list() == expected["utt_id"].to_list()
    assert got["sentiment"].to_list() == expected["sentiment"].to_list()
    assert np.allclose(got["valence"].to_numpy(), expected["valence"].to_numpy())
    assert np.allclose(np.stack(got["values"].to_numpy()), np.stack(expected["values"].to_numpy()), atol=1e-5)


@pytest.mark.slow
def test_simulate_flow_on_a_local_dask_cluster_of_two_workers(prefect_harness, tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    from esvr.flows.simulate import simulate_flow
    from esvr.tasks.bench.simulate import FakeOpenAIServer, Script, bench_personas
    from esvr.tasks.simulation.simulate import load_dialogues

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    personas = bench_personas(6)
    personas_file = tmp_path / "personas.jsonl"
    personas_file.write_text("".join(json.dumps(p) + "\n" for p in personas))

    with FakeOpenAIServer(Script(end_after=2)) as server:

        def model(role: str) -> dict:
            return {"spec": f"openai:fake-{role}", "base_url": server.base_url, "max_retries": 1}

        def config(name: str, **orchestration) -> PipelineConfig:
            return PipelineConfig.model_validate(
                {
                    "run": {"out_dir": str(tmp_path / name), "experiment": "simulate-dask"},
                    "models": {"supporter": model("supporter"), "seeker": model("seeker")},
                    "orchestration": orchestration,
                    "simulate": {"emotion": False, "concurrency": 4, "tvd": model("tvd"), "rg": model("rg"), "splits": ["test"]},
                }
            )

        base = simulate_flow(config("threads"), personas_file)
        dask = config("dask", task_runner="dask", max_workers=2)
        result = simulate_flow(dask, personas_file)
        out = Path(result["dialogues"])
        shards = json.loads((out.parent / "dialogues.shards" / "shards.json").read_text())
        assert len(shards) == 2 and sum(s["personas"] for s in shards) == 6
        pids = _pids(shards)
        assert len(pids) == 2 and os.getpid() not in pids, shards
        dialogues = sorted(load_dialogues(out), key=lambda d: d["id"])
        expected = sorted(load_dialogues(base["dialogues"]), key=lambda d: d["id"])
        assert [d["id"] for d in dialogues] == sorted(p["id"] for p in personas)
        assert _without_timings(dialogues) == _without_timings(expected)

        # a rerun finds every persona merged: no shard runs, no call reaches the server
        calls = server.script.calls
        simulate_flow(dask, personas_file)
        assert server.script.calls == calls and len(load_dialogues(out)) == 6


@pytest.mark.slow
def test_rollouts_and_evaluation_on_a_dask_cluster_by_address(prefect_harness, stub_server, tmp_path, monkeypatch):
    """Both stages join a running scheduler (``orchestration.address``) and match the threads runner."""
    pytest.importorskip("prefect_dask")
    from distributed import Client, LocalCluster
    from supporter_script import personas, script
    from test_evaluate import scripted, stub_config, write_personas

    from esvr.flows.evaluate import evaluate_flow
    from esvr.flows.train_supporter import rollouts_task
    from esvr.models.backends import load_chat_model
    from esvr.tasks.simulation.simulate import SimulateConfig, build_agents, simulate_dialogues
    from esvr.tasks.supporter.train_supporter import AgentSetup, TrainSupporterConfig, read_rollouts

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stub = ModelConfig(spec="openai:stub", base_url=stub_server.base_url)
    sim = SimulateConfig(emotion=False, supporter_temperature=0.0, seeker_temperature=0.0)
    stub_server.reply = script
    model = load_chat_model(stub)
    dialogues = tmp_path / "dialogues.jsonl"
    assert (
        simulate_dialogues(
            personas(),
            dialogues,
            build_agents(sim, model, model, tvd_model=model, rg_model=model),
            concurrency=4,
            alternatives=True,
        ).written
        == 3
    )
    cfg = TrainSupporterConfig(sweep=[{"h": 2}], selected={"h": 2}, dpo_max_turns=2)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = OrchestrationConfig(task_runner="dask", max_workers=2, address=cluster.scheduler_address)
        with Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())

        def rollouts(name: str, orchestration: OrchestrationConfig | None) -> dict:
            runner = {"run": map_runner(orchestration), "n_shards": orchestration.max_workers} if orchestration else {}
            setup = AgentSetup(sim, stub, stub, stub, stub, None, tmp_path / name, True)
            return rollouts_task(dialogues, tmp_path / name / "rollouts.jsonl", cfg, setup, 0, **runner)

        base = rollouts("threads", None)
        # one dialogue's rollouts are already in the file (an interrupted run): no shard redoes them
        first = [r for r in read_rollouts(base["path"]) if r["dialogue_id"] == "p-train-1"]
        out = tmp_path / "dask" / "rollouts.jsonl"
        out.parent.mkdir()
        out.write_text("".join(json.dumps(r) + "\n" for r in first))
        result = rollouts("dask", dask)
        shards = json.loads((tmp_path / "dask" / "rollouts.shards" / "shards.json").read_text())
        assert result["workers"] == len(_pids(shards)) >= 1 and _pids(shards) <= worker_pids
        assert result["metrics"]["rollouts.existing"] == len(first) and not result["errors"]
        assert result["metrics"]["rollouts.written"] == len(read_rollouts(base["path"])) - len(first)
        assert sorted(read_rollouts(out), key=lambda r: r["key"]) == sorted(read_rollouts(base["path"]), key=lambda r: r["key"])

        stub_server.reply = scripted
        personas_file = write_personas(tmp_path / "personas.jsonl")
        expected = json.loads(
            Path(
                evaluate_flow(stub_config(tmp_path / "threads", stub_server.base_url), personas_path=personas_file)[
                    "evaluate_summary"
                ]
            ).read_text()
        )
        config = stub_config(tmp_path / "dask", stub_server.base_url).model_copy(update={"orchestration": dask})
        summary = json.loads(Path(evaluate_flow(config, personas_path=personas_file)["evaluate_summary"]).read_text())
        assert summary["models"] == expected["models"] and summary["components"] == expected["components"]
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'dask' / 'run' / 'mlflow.db'}")
        runs = mlflow.search_runs(experiment_names=["esvr-eval-test"])
        assert runs["metrics.evaluate.workers"].dropna().tolist() == [2.0]  # three supporters, two workers
        for row in ("good-both", "plain-baseline"):
            got = (tmp_path / "dask" / "run" / "evaluate" / row / "dialogues.jsonl").read_text().splitlines()
            want = (tmp_path / "threads" / "run" / "evaluate" / row / "dialogues.jsonl").read_text().splitlines()
            by_id = lambda lines: sorted((_without_timings(json.loads(line)) for line in lines), key=lambda d: d["id"])  # noqa: E731
            assert by_id(got) == by_id(want)
