"""Flow `simulate`: personas + supporter + seeker (+ TVD, RG) -> dialogues.jsonl (+ SFT data). Stage 6.

Paper §5.3-5.4 and §6.1. The supporter and seeker are ``models.supporter`` / ``models.seeker``
unless given; TVD and RG are optional chat models (``simulate.tvd`` / ``simulate.rg`` or
arguments), absent meaning the paper's ablations. Dialogues go to
``<run>/simulate/<name>/dialogues.jsonl``, appended as they finish: rerunning the same command after
an interruption resumes (finished dialogues are skipped, answered calls come from the response
cache). With ``orchestration.task_runner`` dask or ray the personas are split into shards that the
cluster's workers simulate (`esvr.tasks.simulation.sharded.simulate_on_runner`). When train or dev
personas were simulated, the supporter's SFT data is exported next to it (Tables 9 and 10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig
from esvr.flows.task_runners import map_runner, uses_cluster
from esvr.models.config import ModelConfig
from esvr.models.emotion import EmotionConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.common.roles import model_config
from esvr.tasks.common.shards import shard_dir, shard_runs
from esvr.tasks.simulation.personas import read_personas
from esvr.tasks.simulation.sharded import ShardSetup, simulate_on_runner
from esvr.tasks.simulation.simulate import (
    SIMULATE_PROMPTS,
    SimulationFailed,
    SimulationSummary,
    check_simulation,
    load_dialogues,
    opened_agents,
    simulate_dialogues,
)
from esvr.tasks.supporter.sft_export import export_sft, sft_metrics


def emotion_config(config: PipelineConfig) -> EmotionConfig | None:
    """The label stage's emotion scorer when the simulation's valence end rule is on (else None)."""
    return config.label.emotion if config.simulate.emotion else None


@task(cache_policy=NO_CACHE, persist_result=False)
def simulate_task(
    config: PipelineConfig,
    personas: list[dict],
    out: Path,
    supporter: ModelConfig,
    tvd: ModelConfig | None,
    rg: ModelConfig | None,
) -> SimulationSummary:
    """Not cached by Prefect: dialogues.jsonl itself is the resumable record of what is done."""
    cfg = config.simulate
    with opened_agents(
        cfg,
        supporter,
        config.models.seeker,
        tvd=tvd,
        rg=rg,
        emotion=emotion_config(config),
        run_dir=config.run.out_dir.resolve(),
        use_cache=config.models.cache,
    ) as agents:
        return simulate_dialogues(
            personas, out, agents, concurrency=cfg.concurrency, alternatives=cfg.alternatives, seed=config.run.seed
        )


@flow(name="simulate", log_prints=True)
def simulate_flow(
    config: PipelineConfig,
    personas_path: str | Path | None = None,
    splits: list[str] | None = None,
    supporter: ModelConfig | str | None = None,
    tvd: ModelConfig | str | None = None,
    rg: ModelConfig | str | None = None,
    name: str = "main",
    export: bool = True,
) -> dict[str, str]:
    """Simulate the personas of `splits`; returns {'dialogues': path, ['sft_train', 'sft_dev', 'sft_stats']}.

    `supporter`, `tvd`, `rg`: a spec, a trained component (``mlflow:<run_id>``, an adapter folder)
    or a ModelConfig; None takes ``models.supporter``, ``simulate.tvd``, ``simulate.rg``. Pass
    ``tvd=""``/``rg=""`` to leave one out explicitly.
    """
    cfg = config.simulate
    run = RunPaths(config.run.out_dir.resolve())
    personas_file = Path(personas_path) if personas_path else run.out_dir / "personas" / "personas.jsonl"
    splits = list(splits or cfg.splits)
    sup_cfg = model_config(supporter) or config.models.supporter
    tvd_cfg = cfg.tvd if tvd is None else model_config(tvd)
    rg_cfg = cfg.rg if rg is None else model_config(rg)
    out_dir = run.stage("simulate") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "dialogues.jsonl"
    tags = {"esvr.simulate.name": name, "esvr.simulate.splits": ",".join(splits)}
    with tracking.flow_run(f"simulate-{name}", config, section="simulate", tags=tags, prompts=SIMULATE_PROMPTS):
        personas = []
        for split in splits:
            chosen = read_personas(personas_file, [split])
            personas += chosen[: cfg.max_personas] if cfg.max_personas is not None else chosen
        if not personas:
            raise ValueError(f"{personas_file}: no persona in split(s) {splits} to simulate")
        tracking.log_metrics({"simulate.personas": len(personas)})
        print(
            f"simulating {len(personas)} personas ({', '.join(splits)}) with supporter {sup_cfg.spec}, "
            f"tvd {tvd_cfg.spec if tvd_cfg else 'none'}, rg {rg_cfg.spec if rg_cfg else 'none'} -> {out}"
        )
        if uses_cluster(config.orchestration):
            setup = ShardSetup(
                cfg,
                {"supporter": sup_cfg, "seeker": config.models.seeker, "tvd": tvd_cfg, "rg": rg_cfg},
                emotion_config(config),
                str(run.out_dir),
                config.models.cache,
            )
            summary = simulate_on_runner(
                map_runner(config.orchestration), config.orchestration.max_workers, setup, personas, out, config.run.seed
            )
            shards = shard_runs(out)
            workers = len({s["worker_pid"] for s in shards})
            tracking.log_metrics({"simulate.shards": len(shards), "simulate.workers": workers})
            tracking.log_artifact(shard_dir(out) / "shards.json", f"simulate/{name}")
            print(f"{len(shards)} shards on {workers} {config.orchestration.task_runner} worker process(es)")
        else:
            summary = simulate_task(config, personas, out, sup_cfg, tvd_cfg, rg_cfg)
        tracking.log_metrics(summary.metrics())
        tracking.log_usage()
        if out.stat().st_size < 50 << 20:
            tracking.log_artifact(out, f"simulate/{name}")
        print(
            f"dialogues: {summary.written} new, {summary.skipped} already done, {len(summary.errors)} errors; "
            f"end reasons {summary.end_reasons}; {summary.supporter_turns} supporter turns "
            f"({summary.failed_turns} failed, {summary.stepwise_turns} stepwise, {summary.reasked_turns} re-asked); "
            f"{summary.calls_per_supporter_turn:.2f} LLM calls per supporter turn"
        )
        if summary.errors:
            print(
                f"{len(summary.errors)} dialogues hit backend errors and were not written; rerun to retry them: {summary.errors[:3]}"
            )
        dialogues = load_dialogues(out)
        ids = {str(p["id"]) for p in personas}
        check_simulation(summary, [d for d in dialogues if str(d["id"]) in ids], cfg.max_failed_share)
        artifacts = {"dialogues": str(out)}
        sft_splits = [s for s in ("train", "dev") if s in splits]
        if export and sft_splits:
            by_split: dict[str, list[dict[str, Any]]] = {s: [d for d in dialogues if d.get("split") == s] for s in sft_splits}
            result = export_sft(by_split, out_dir / "sft")
            tracking.log_metrics(sft_metrics(result["stats"]))
            tracking.log_artifact(out_dir / "sft", f"simulate/{name}/sft")
            for s, p in result["paths"].items():
                artifacts[f"sft_{s}"] = p
                st = result["stats"][s]
                print(
                    f"SFT {s}: {st['dialogues']} dialogues, {st['turns']} turns, {st['examples_before_filter']} examples, "
                    f"{st['examples']} after the strategy filter"
                )
            artifacts["sft_stats"] = result["stats_path"]
            if not any(st["examples"] for st in result["stats"].values()):
                raise SimulationFailed(
                    f"{out_dir / 'sft'}: no SFT example from {sum(len(d) for d in by_split.values())} "
                    f"{'/'.join(sft_splits)} dialogues (dropped: {[st.get('dropped') for st in result['stats'].values()]})"
                )
        return artifacts
