"""Flow `smoke`: config -> default model reply + score_choices -> cached task -> MLflow run.

The pattern every stage flow follows: its cached tasks wrap the stage's plain functions
(``esvr.tasks``); the flow opens an MLflow run, calls the tasks with the config's sections, logs
metrics and artifacts and returns artifact paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.smoke import smoke

smoke_task = task(
    name="smoke_task",
    cache_policy=cache_policy("esvr.tasks.smoke", "esvr.models.chat", "esvr.models.hf_backend"),
    persist_result=True,
)(smoke)


@flow(name="smoke", log_prints=True)
def smoke_flow(config: PipelineConfig) -> dict[str, str]:
    paths = RunPaths(config.run.out_dir.resolve())
    with tracking.flow_run("smoke", config, section="smoke"):
        result_path = smoke_task(config.models.supporter, config.smoke, paths.out_dir, config.models.cache)
        result = json.loads(Path(result_path).read_text())
        tracking.log_metrics({f"smoke.p_{k}": v for k, v in result["choices"].items()})
        tracking.log_artifact(result_path, "smoke")
        tracking.log_usage()
        print(f"reply: {result['reply']}")
        return {"smoke": result_path}
