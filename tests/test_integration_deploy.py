"""The deployment for real, without Docker: servers and a worker as processes on 127.0.0.1.

A Prefect server (SQLite), an MLflow server (SQLite + proxied artifacts) and a process worker run
as subprocesses, the way docker-compose.yml runs them as containers. `esvr deploy` registers
prefect.yaml's deployments; runs are triggered through the API and executed by the
worker in its own processes:

- `pipeline` on a recipe that runs the smoke stage against a scripted OpenAI-compatible server:
  the run completes and its MLflow run (with the nested stage run) is on the MLflow server;
- `ingest-new-dumps` as the schedule runs it, twice, with a new month's dump dropped into the
  folder in between: each scan carries its dumps downstream (label, datasets, and the TVD and RG
  training on the `gpu` pool's deployments, run by a second worker). The second scan stages only
  the new dump, labels exactly the utterances it added, rebuilds the datasets and trains again:
  MLflow holds both training runs with the same metric keys, each tagged with the dumps it saw. A
  third scan, with nothing new, does nothing beyond the scan.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from conftest import ONE_STEP_TRAINING, demo_recipe

from esvr.flows.deploy import PROJECT_DIR

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server or worker subprocess in its own process group, with its log in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        fh = open(self.log, "wb")

        def child_setup() -> None:
            # Started from a background job, SIGINT may be ignored; the worker maps SIGTERM onto it.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.popen = subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=log_dir, start_new_session=True, preexec_fn=child_setup
        )
        fh.close()

    def tail(self, n: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log ({self.log}), last {n} chars ---\n{text[-n:]}"

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=5)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)


def wait_http(url: str, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            pytest.fail(f"{proc.name} exited with {proc.popen.returncode} before answering {url}\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{proc.name} did not answer {url} within {timeout_s:.0f} s\n{proc.tail()}")


def wait_runs(client, run_ids: list, procs: list[Proc], timeout_s: float) -> dict:
    """Poll flow runs until all are final; fail with the states and the logs otherwise."""
    deadline = time.monotonic() + timeout_s
    runs = {}
    while time.monotonic() < deadline:
        runs = {rid: client.read_flow_run(rid) for rid in run_ids}
        if all(r.state and r.state.is_final() for r in runs.values()):
            break
        for p in procs:
            if p.popen.poll() is not None:
                pytest.fail(f"{p.name} exited with {p.popen.returncode}\n{p.tail()}")
        time.sleep(1)
    else:
        states = {r.name: r.state.name if r.state else None for r in runs.values()}
        pytest.fail(f"flow runs not finished within {timeout_s:.0f} s: {states}\n" + "\n".join(p.tail() for p in procs))
    bad = {r.name: f"{r.state.name}: {r.state.message}" for r in runs.values() if not r.state.is_completed()}
    if bad:
        logs = {r.name: run_logs(client, r.id) for r in runs.values() if not r.state.is_completed()}
        pytest.fail(f"flow runs failed: {bad}\n{json.dumps(logs, indent=1)[-6000:]}\n" + "\n".join(p.tail(2000) for p in procs))
    return runs


def run_logs(client, run_id) -> list[str]:
    """The log messages of a flow run and of its sub-flow runs."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
    )
    ids = [run_id, *(c.id for c in children)]
    return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))]


def wait_log(client, run_id, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        messages = run_logs(client, run_id)
        found = next((m for m in messages if text in m), None)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"no log line with {text!r} in flow run {run_id} and its sub-flows: {messages}")
        time.sleep(1)


def stub_reply(request: dict) -> str:
    return "Listening without judgment helps a friend feel less alone."


@pytest.fixture()
def stack(tmp_path: Path):
    """Prefect server, MLflow server and a worker on the `cpu` pool; torn down as process groups."""
    from stub_server import StubServer

    prefect_port, mlflow_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    server_env = {**env, "PREFECT_UI_ENABLED": "false"}  # the API is what the test drives; the UI only costs start-up
    worker_env = {
        **env,
        "PREFECT_API_URL": api_url,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "ESVR_PROJECT_DIR": str(PROJECT_DIR),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "ESVR_TEST_KEY": "unused",  # the stub server ignores the key; the client insists on one
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[Proc] = []
    stub = StubServer(reply=stub_reply).start()
    try:
        prefect = Proc(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            server_env,
            logs,
        )
        procs.append(prefect)
        mlflow_server = Proc(
            "mlflow-server",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--artifacts-destination",
                str(tmp_path / "mlartifacts"),
            ],
            env,
            logs,
        )
        procs.append(mlflow_server)
        wait_http(f"{api_url}/health", prefect, 180)
        wait_http(f"{mlflow_url}/health", mlflow_server, 180)
        yield {
            "api_url": api_url,
            "mlflow_url": mlflow_url,
            "worker_env": worker_env,
            "logs": logs,
            "procs": procs,
            "stub": stub,
            "tmp": tmp_path,
        }
    finally:
        for p in reversed(procs):
            p.stop()
        stub.close()


def test_deploy_trigger_track_and_carry_new_dumps_downstream(stack):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from esvr.flows.refresh import TRAIN_DEPLOYMENTS, datasets_digest
    from esvr.tasks.reddit.sample_dump import make_sample_dump

    tmp: Path = stack["tmp"]
    dumps = tmp / "dumps"
    make_sample_dump(dumps, months=["2021-06"], posts=60)
    config_path = demo_recipe(
        tmp / "deploy-test.yaml",
        tmp / "run",
        dumps,
        run={"name": "deploy-test", "experiment": "deploy-test", "stages": ["smoke"]},
        **ONE_STEP_TRAINING,
        models={
            "supporter": {
                "spec": "openai:stub",
                "base_url": stack["stub"].base_url,
                "api_key_env": "ESVR_TEST_KEY",
                "max_retries": 1,
            }
        },
        ingest={"schedule_cron": "17 4 * * *"},
    )

    # The workers start first (each creates its pool) and come up while `esvr deploy` runs; the
    # `gpu` pool's worker runs the training deployments (on this machine's CPU).
    for pool in ("cpu", "gpu"):
        worker = Proc(
            f"worker-{pool}",
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            stack["worker_env"],
            stack["logs"],
        )
        stack["procs"].append(worker)

    # `esvr deploy`, as a user runs it (docs/deployment.md)
    proc = subprocess.run(
        [str(BIN / "esvr"), "deploy", "--config", str(config_path)],
        cwd=PROJECT_DIR,
        env={**stack["worker_env"], "PREFECT_API_URL": stack["api_url"]},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (
        "pipeline-from-file/pipeline",
        "ingest-new-dumps/ingest-new-dumps",
        "train-tvd-from-file/train-tvd",
        "train-rg-from-file/train-rg",
        "train-supporter-from-file/train-supporter",
    ):
        assert f"registered {name}" in proc.stdout, proc.stdout

    with temporary_settings({PREFECT_API_URL: stack["api_url"]}):
        with get_client(sync_client=True) as client:
            ingest_dep = client.read_deployment_by_name("ingest-new-dumps/ingest-new-dumps")
            assert [s.schedule.cron for s in ingest_dep.schedules] == ["17 4 * * *"]  # from the config
            assert ingest_dep.parameters["config_path"] == str(config_path)
            assert ingest_dep.work_pool_name == "cpu"
            # one scan at a time: an overlapping scheduled scan is cancelled
            assert ingest_dep.global_concurrency_limit is not None and ingest_dep.global_concurrency_limit.limit == 1
            assert ingest_dep.concurrency_options is not None
            assert ingest_dep.concurrency_options.collision_strategy == "CANCEL_NEW"
            assert client.read_deployment_by_name("train-tvd-from-file/train-tvd").work_pool_name == "gpu"

        procs = stack["procs"]

        # 1. the pipeline and the first scan, triggered through the API, run side by side
        pipeline_run = run_deployment("pipeline-from-file/pipeline", timeout=0, parameters={"config_path": str(config_path)})
        first_scan = run_deployment("ingest-new-dumps/ingest-new-dumps", timeout=0, parameters={"min_age_s": 0})
        with get_client(sync_client=True) as client:
            wait_runs(client, [pipeline_run.id, first_scan.id], procs, 1800)
            first_logs = " ".join(run_logs(client, first_scan.id))

        run_dir = tmp / "run"
        manifest_path = run_dir / "ingest" / "manifest.json"
        first = json.loads(manifest_path.read_text())["dumps"]
        assert sorted(e["name"] for e in first.values()) == ["RC_2021-06.zst", "RS_2021-06.zst"], first_logs
        assert (run_dir / "ingest" / "threads.parquet").exists()
        first_ids = set(pl.read_parquet(run_dir / "label" / "labels.parquet")["utt_id"].to_list())
        first_stats = json.loads((run_dir / "label" / "label_stats.json").read_text())
        assert first_stats["new_utterances"] == len(first_ids) > 0
        first_datasets = datasets_digest(run_dir / "datasets")

        # the pipeline's MLflow run, with its stage run nested, is on the MLflow server
        ml = MlflowClient(tracking_uri=stack["mlflow_url"])
        exp = ml.get_experiment_by_name("deploy-test")
        assert exp is not None, "the pipeline run logged no experiment to the MLflow server"
        runs = ml.search_runs([exp.experiment_id], filter_string="tags.`esvr.stage` = 'pipeline'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["run.stages"] == "['smoke']"
        smoke = ml.search_runs([exp.experiment_id], filter_string="tags.`esvr.stage` = 'smoke'")
        assert len(smoke) == 1 and smoke[0].data.tags["mlflow.parentRunId"] == runs[0].info.run_id
        assert "smoke.p_Yes" in smoke[0].data.metrics
        artifacts = [a.path for a in ml.list_artifacts(smoke[0].info.run_id, "smoke")]
        assert artifacts == ["smoke/smoke.json"]  # proxied through the server to its artifact store

        # 2. a new month's dump appears; the second scan ingests only it and carries it downstream
        newer = tmp / "newer"
        make_sample_dump(newer, months=["2021-06", "2021-07"], posts=120, seed=1)
        for name in ("RS_2021-07.zst", "RC_2021-07.zst"):
            shutil.copy(newer / name, dumps / name)
        second_scan = run_deployment("ingest-new-dumps/ingest-new-dumps", timeout=0, parameters={"min_age_s": 0})
        with get_client(sync_client=True) as client:
            wait_runs(client, [second_scan.id], procs, 1800)

        with get_client(sync_client=True) as client:
            new_line = wait_log(client, second_scan.id, "new dumps:", 30)
        assert new_line.endswith("new dumps: ['RC_2021-07.zst', 'RS_2021-07.zst']"), new_line
        second = json.loads(manifest_path.read_text())["dumps"]
        assert sorted(e["name"] for e in second.values()) == [
            "RC_2021-06.zst",
            "RC_2021-07.zst",
            "RS_2021-06.zst",
            "RS_2021-07.zst",
        ]
        # The sub-flow's summary line; logs reach the server in batches, so give it a moment.
        with get_client(sync_client=True) as client:
            summary = wait_log(client, second_scan.id, "staged now:", 30)
        staged_now = summary.split("staged now:")[1].split(", reused:")[0]
        assert "2021-07" in staged_now and "2021-06" not in staged_now, summary  # June was not staged again
        for sha, entry in first.items():
            assert second[sha]["ingested_at"] == entry["ingested_at"]

        # labeling ran on exactly the utterances the new dump added; the rest came from the store
        second_ids = set(pl.read_parquet(run_dir / "label" / "labels.parquet")["utt_id"].to_list())
        stats = json.loads((run_dir / "label" / "label_stats.json").read_text())
        assert stats["new_utterances"] == len(second_ids - first_ids) > 0
        assert stats["cached_utterances"] == len(first_ids & second_ids) == len(first_ids)
        label_runs = ml.search_runs([exp.experiment_id], filter_string="tags.`esvr.stage` = 'label'", order_by=["start_time ASC"])
        assert [r.data.metrics["label.new_utterances"] for r in label_runs] == [len(first_ids), len(second_ids - first_ids)]
        # the datasets were rebuilt on the merged threads
        assert datasets_digest(run_dir / "datasets") != first_datasets
        assert len(ml.search_runs([exp.experiment_id], filter_string="tags.`esvr.stage` = 'build_datasets'")) == 2

        # the components trained again on the gpu pool's deployments, each run tagged with its dumps
        both = ["RC_2021-06.zst,RS_2021-06.zst", "RC_2021-06.zst,RC_2021-07.zst,RS_2021-06.zst,RS_2021-07.zst"]
        for component in ("tvd", "rg"):
            trained = ml.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`esvr.component` = '{component}' and tags.`esvr.training_stage` = 'sft'",
                order_by=["start_time ASC"],
            )
            assert [r.data.tags["esvr.dumps"] for r in trained] == both, component
            assert [r.data.tags["esvr.new_dumps"] for r in trained] == [
                "RC_2021-06.zst,RS_2021-06.zst",
                "RC_2021-07.zst,RS_2021-07.zst",
            ]
            assert all(r.info.status == "FINISHED" for r in trained)
            assert trained[0].data.metrics.keys() == trained[1].data.metrics.keys() != set(), component
        with get_client(sync_client=True) as client:
            for name in TRAIN_DEPLOYMENTS:
                dep = client.read_deployment_by_name(name)
                done = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                assert sorted(r.state.name for r in done) == ["Completed", "Completed"], name
                assert {r.parent_task_run_id is not None for r in done} == {True}  # sub-runs of the scans

        # 3. nothing new: the scan does nothing else
        third_scan = run_deployment("ingest-new-dumps/ingest-new-dumps", timeout=0, parameters={"min_age_s": 0})
        with get_client(sync_client=True) as client:
            wait_runs(client, [third_scan.id], procs, 300)
            assert wait_log(client, third_scan.id, "no new dumps in", 30)
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[third_scan.id]))
            )
        assert children == []
        assert len(ml.search_runs([exp.experiment_id], filter_string="tags.`esvr.stage` = 'label'")) == 2
