"""Flow `pipeline`: the whole DAG of the paper, stage by stage, every stage cached.

Reads like the paper's Figure 3:

    Reddit dumps -> threads -> labels (emotion, 20 values)           §4, App. B
                 -> TVD / RG datasets -> target value detector        §5.1, App. D.1
                                      -> reference generator (SFT+DPO) §5.2, App. D.2
    seeker personas -> simulated dialogues (TVD + RG in the loop)     §5.3-5.4, App. E
                    -> supporter SFT -> look-ahead value reward -> DPO §5.3, App. D.3
                    -> evaluation (ES-Skills, ES-Intensity, ES-Value) -> report   §6

Each stage is a row of `esvr.flows.stages.PIPELINE`: its flow, the artifacts it reads, the keys
it publishes, whether it runs again for each of `variants` and frees the models after.
`config.run.stages` picks a subset (a stage whose inputs come from a skipped stage reads them
from the run folder, where an earlier run left them). `analyze_esconv` (paper §3) runs when
`analyze_esconv.esconv` names a file; `smoke` only when asked for.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig, load_config
from esvr.flows.memory import StageMemory
from esvr.flows.stages import PIPELINE, Artifacts, Stage
from esvr.tasks.common.roles import release_models


def run_stage(stage: Stage, config: PipelineConfig, artifacts: Artifacts) -> dict[str, str]:
    """One run of the stage's flow on `config`, reading what earlier stages published."""
    result = stage.load()(config, **stage.arguments(config, artifacts))
    if stage.frees_models:
        release_models()
    return result


def variant_reads(variant: PipelineConfig) -> dict[str, str | None]:
    """What a variant's stages read in place of the main run's artifacts, before its own results."""
    # A generator trained without values has no use for target values: no detector.
    return {} if variant.train_rg.with_values else {"tvd": None}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig) -> dict[str, str]:
    artifacts: dict[str, str] = {}
    variants = {name: config.variant(name) for name in config.variants}
    # a variant's stages read its own results over the main run's
    own = {name: variant_reads(vconfig) for name, vconfig in variants.items()}
    memory = StageMemory()
    with tracking.flow_run("pipeline", config, tags={"esvr.kind": "pipeline"}), memory:
        for stage in PIPELINE:
            if not config.selected(stage.name):
                continue
            memory.begin(stage.name)
            artifacts.update(stage.published(run_stage(stage, config, artifacts)))
            for name, vconfig in variants.items():
                if stage.runs_for_variant(vconfig, config):
                    print(f"variant {name}: {stage.name} on its own recipe")
                    result = run_stage(stage, vconfig, artifacts | own[name])
                    own[name].update(result)
                    artifacts.update(stage.published(result, variant=name))
        tracking.log_usage()
        tracking.log_metrics(memory.metrics())
        print("peak memory per stage:\n" + memory.table())
    return artifacts


@flow(name="pipeline-from-file", log_prints=True)
def pipeline_from_file(config_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict[str, str]:
    """The deployment entry point: parameters are a recipe file and overrides, as on the CLI."""
    config = load_config(config_path, list(overrides or []))
    if out_dir:
        config.run.out_dir = Path(out_dir)
    return pipeline_flow(config)
