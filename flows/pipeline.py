"""Flow `pipeline`: the whole DAG of the paper, stage by stage, every stage cached.

Reads like the paper's Figure 3: Reddit threads -> labels -> component datasets -> target value
detector and reference generator -> seeker personas -> simulated dialogues -> supporter (SFT, then
DPO on the look-ahead value reward) -> evaluation. `config.run.stages` picks a subset.
"""

from __future__ import annotations

from prefect import flow

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig, load_config

STAGES = ["smoke"]


def selected(config: PipelineConfig, stage: str) -> bool:
    return not config.run.stages or stage in config.run.stages


def check_stages(config: PipelineConfig) -> None:
    unknown = [s for s in config.run.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"run.stages: unknown stage(s) {unknown}; known: {STAGES}")


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig) -> dict[str, str]:
    check_stages(config)
    artifacts: dict[str, str] = {}
    with tracking.flow_run("pipeline", config, tags={"esvr.kind": "pipeline"}):
        if selected(config, "smoke"):
            from esvr.flows.smoke import smoke_flow

            artifacts.update(smoke_flow(config))
    return artifacts


@flow(name="pipeline-from-file", log_prints=True)
def pipeline_from_file(config_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict[str, str]:
    """The deployment entry point: parameters are a recipe file and overrides, as on the CLI."""
    config = load_config(config_path, list(overrides or []))
    if out_dir:
        config.run.out_dir = out_dir
    return pipeline_flow(config)
