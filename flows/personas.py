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


def import_personas_files(
    config: PipelineConfig,
    sources: list[Path],
    out: Path | None = None,
    split: str | None = None,
    use_writer: bool = True,
) -> dict[str, str]:
    """`esvr personas import`: ESConv-style records and role cards -> personas.jsonl (default the
    run's, which `simulate` and `evaluate` read) and import_report.json beside it. The persona
    writer (`models.persona_writer`) is started only if a rule leaves a field unmapped."""
    from esvr.tasks.common.jsonl import write_jsonl
    from esvr.tasks.common.roles import chat_model
    from esvr.tasks.simulation.personas import import_personas

    run_dir = str(config.run.out_dir.resolve())
    writer = (lambda: chat_model(config.models.persona_writer, run_dir, cache=config.models.cache)) if use_writer else None
    personas, report = import_personas(sources, writer, config.personas, split, config.run.seed)
    path = out or personas_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    report_path = path.with_name("import_report.json")
    report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if not personas:
        why = report.dropped[0]["reason"] if report.dropped else "no record"
        raise ValueError(f"personas import: no persona from {[str(s) for s in sources]} (first: {why}); see {report_path}")
    write_jsonl(personas, path)
    counts = ", ".join(f"{k} {dict(v)}" for k, v in report.as_dict()["fields"].items())
    print(f"personas import: {report.personas} personas, {len(report.dropped)} records left out; {counts}")
    return {"personas": str(path), "import_report": str(report_path)}
