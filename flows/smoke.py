"""Flow `smoke`: config -> default model reply + score_choices -> cached task -> MLflow run.

The pattern every stage flow follows: open an MLflow run, build what the stage needs from the
config, call the cached task(s), log metrics and artifacts, return artifact paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig
from esvr.flows.runtime import RunPaths
from esvr.tasks.smoke import smoke_task


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
