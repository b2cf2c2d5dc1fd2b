"""Flow `personas`: taxonomies -> personas.jsonl (stage 5, paper §5.4, App. E.1).

Situations per (problem category, value) from the persona writer, value-alignment filter, emotion
by majority vote, demographics, stratified train/dev/test split. The whole generation is one cached
task keyed by the persona config, the writer model and the seed; every LLM call also goes through
the response cache, so an interrupted run costs nothing to repeat.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.simulation.personas import PERSONA_PROMPTS, make_personas

# Keyed by the persona config, the writer model and the seed (and the stage's code).
personas_task = task(name="personas_task", cache_policy=cache_policy("esvr.tasks.simulation"), persist_result=True)(make_personas)


def personas_path(config: PipelineConfig) -> Path:
    """Where the run's personas.jsonl is (the default input of `simulate`)."""
    return config.run.out_dir.resolve() / "personas" / "personas.jsonl"


@flow(name="personas", log_prints=True)
def personas_flow(config: PipelineConfig) -> dict[str, str]:
    """Returns the artifact paths: personas, personas_rejected, personas_stats."""
    out = RunPaths(config.run.out_dir.resolve()).stage("personas")
    with tracking.flow_run("personas", config, section="personas", prompts=PERSONA_PROMPTS):
        # a cache hit is only good while the files it names are still there
        fresh = not (out / "personas.jsonl").exists()
        paths = personas_task.with_options(refresh_cache=fresh)(
            config.models.persona_writer,
            config.personas,
            config.run.seed,
            out,
            str(config.run.out_dir.resolve()),
            config.models.cache,
        )
        stats = json.loads(Path(paths["personas_stats"]).read_text())
        tracking.log_metrics({f"personas.{k}": v for k, v in stats.items()})
        tracking.log_usage()
        for key in ("personas", "personas_stats", "personas_rejected"):
            tracking.log_artifact(paths[key], "personas")
        splits = {s: stats.get(f"split.{s}", 0) for s in ("train", "dev", "test")}
        print(
            f"personas: {sum(splits.values())} ({splits['train']} train / {splits['dev']} dev / {splits['test']} test) "
            f"from {stats.get('situations.kept', 0)} situations; {stats.get('alignment.rejected', 0)} rejected on value alignment"
        )
        if not sum(splits.values()):
            kept, rejected = stats.get("situations.kept", 0), stats.get("alignment.rejected", 0)
            why = (
                f"all {rejected} situations were rated below personas.min_alignment={config.personas.min_alignment}"
                if kept and rejected >= kept
                else f"{stats.get('situations.pairs_failed', 0)} of {stats.get('situations.pairs', 0)} (category, value) "
                "pairs gave no parseable situation"
            )
            raise ValueError(
                f"personas: none kept ({why}); the persona writer {config.models.persona_writer.spec!r} does not "
                f"follow the prompts' format well enough: see {paths['personas_stats']}"
            )
        return paths
