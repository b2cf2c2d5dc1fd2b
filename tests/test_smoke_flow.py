"""The minimal flow for real: Prefect caches across runs, MLflow holds one run per flow run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from esvr.flows.config import load_config


@pytest.fixture()
def config(tiny_llama: Path, tmp_path: Path):
    return load_config(
        None,
        [
            f"run.out_dir={tmp_path / 'run'}",
            f"models.supporter=hf:{tiny_llama}",
            "run.experiment=smoke-test",
            "run.stages=[smoke]",
        ],
    )


def test_second_run_is_cached_and_mlflow_has_both_runs(prefect_harness, config):
    from esvr.flows.pipeline import pipeline_flow

    first = pipeline_flow(config, return_state=True)
    second = pipeline_flow(config, return_state=True)
    assert first.is_completed() and second.is_completed()
    out = Path(second.result()["smoke"])
    result = json.loads(out.read_text())
    assert set(result["choices"]) == {"Yes", "No"}

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def task_states():
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="smoke_task")))
            return sorted((r.start_time or r.expected_start_time, r.state.name) for r in runs)

    import asyncio

    states = [name for _, name in asyncio.run(task_states())]
    assert states[-2:] == ["Completed", "Cached"]

    mlflow.set_tracking_uri(f"sqlite:///{config.run.out_dir.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["smoke-test"], filter_string="tags.`esvr.stage` = 'pipeline'")
    assert len(runs) == 2
    assert (runs["params.run.seed"] == "0").all()
    # each stage's peak memory, for the demo's budget: the smoke stage loaded a model
    assert (runs["metrics.memory.smoke.peak_rss_mb"] > 100).all()
    assert (runs["metrics.memory.smoke.peak_total_mb"] >= runs["metrics.memory.smoke.peak_rss_mb"]).all()
    assert (runs["params.models.supporter.spec"] == f"hf:{config.models.supporter.spec[3:]}").all()
    smoke_runs = mlflow.search_runs(experiment_names=["smoke-test"], filter_string="tags.`esvr.stage` = 'smoke'")
    assert len(smoke_runs) == 2 and smoke_runs["tags.mlflow.parentRunId"].notna().all()
    # token usage of the models the flow loaded is recorded
    usage_calls = [c for c in smoke_runs.columns if c.startswith("metrics.usage.") and c.endswith(".calls")]
    assert usage_calls and smoke_runs[usage_calls[0]].max() >= 2
