"""Flow `evaluate`: supporters under test x test personas -> dialogues -> judges -> summary. Stage 8.

Paper §6. Each supporter of ``evaluate.supporters`` talks with the seeker simulator
(``models.seeker``) over the test personas with stage 6's engine and end rules; the judge
(``models.judge``) scores ES-Skills and ES-Intensity per dialogue and ES-Value per pair against
``evaluate.reference``; the summary carries means, Mann-Whitney p-values and the paper's marks.
Artifacts under ``<run>/evaluate/``: ``<slug>/dialogues.jsonl``, ``<slug>/judgments.jsonl``,
``<slug>/es_value.jsonl``, ``summary.json``. Everything resumes: dialogues by file, judgments by
Prefect's cache and the response cache. With ``orchestration.task_runner`` dask or ray each
supporter's dialogues are one task on the cluster's workers; the judges run here.

Also here: `judge_vs_human_flow` (App. H) and `simulator_fidelity_flow` (App. E.2, F.2).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.flows.task_runners import map_runner, uses_cluster
from esvr.models.config import ModelConfig
from esvr.tasks.common import roles
from esvr.tasks.common.jsonl import read_jsonl
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.evaluation.baselines import BASELINE_PROMPTS, finetune_baseline
from esvr.tasks.evaluation.evaluate import (
    Judging,
    SupporterUnderTest,
    evaluation_dialogues,
    evaluation_simulate_config,
    judge_dialogues,
    judge_values,
    make_agents,
    row_dialogues,
    summarize,
    summary_metrics,
)
from esvr.tasks.evaluation.judges import JUDGE_PROMPTS

SupporterRef = ModelConfig | str
#: the stage's code: every task's cache key follows its source
STAGE = "esvr.tasks.evaluation"


# Not cached by Prefect: dialogues.jsonl is itself the resumable record (stage 6's engine).
evaluation_dialogues_task = task(name="evaluation_dialogues_task", cache_policy=NO_CACHE, persist_result=False)(
    evaluation_dialogues
)
# Keyed by the dialogues' content, the judge, the settings and the judge prompts' content.
judge_dialogues_task = task(
    name="judge_dialogues_task", cache_policy=cache_policy(STAGE, prompts=JUDGE_PROMPTS), persist_result=True
)(judge_dialogues)
judge_values_task = task(name="judge_values_task", cache_policy=cache_policy(STAGE, prompts=JUDGE_PROMPTS), persist_result=True)(
    judge_values
)


@task(cache_policy=cache_policy(STAGE, "esvr.models.training"), persist_result=True)
def finetune_baseline_task(kind: str, data: Path, base: ModelConfig, train: Any, out: Path) -> str:
    """A fine-tuned baseline's chat spec, trained once per corpus content, base and settings."""
    return finetune_baseline(kind, data, base.spec, train, out)  # type: ignore[arg-type]


def supporter_model(config: PipelineConfig, s: SupporterUnderTest, override: SupporterRef | None, stage_dir: Path) -> ModelConfig:
    """The chat model of a supporter under test: the flow's override, a component, a fine-tuned
    baseline (trained here, cached), the row's model, or models.supporter."""
    if override is not None:
        return roles.model_config(override)  # type: ignore[return-value]
    if s.component is not None and s.component.startswith("pipeline:"):
        raise ValueError(
            f"evaluate.supporters row {s.name!r} takes the pipeline's trained {s.component[len('pipeline:') :]!r}: "
            f"run it through `esvr run`, or give its model: esvr evaluate --supporter '{s.name}=mlflow:<run_id>'"
        )
    if s.component is not None:
        return roles.model_config(s.component)  # type: ignore[return-value]
    if s.finetune is not None:
        spec = finetune_baseline_task(
            s.finetune,
            Path(s.finetune_data),  # type: ignore[arg-type]  # set whenever finetune is (the row's validator)
            roles.base_model(config.models.base),
            config.evaluate.finetune_train,
            stage_dir / "baselines" / s.slug,
        )
        return ModelConfig(spec=spec)
    return s.model or config.models.supporter


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config: PipelineConfig,
    personas_path: str | Path | None = None,
    supporters: Mapping[str, SupporterRef | Mapping[str, SupporterRef | None]] | None = None,
    tvd: SupporterRef | None = None,
    rg: SupporterRef | None = None,
) -> dict[str, str]:
    """Evaluate ``evaluate.supporters``; returns {'evaluate_summary': summary.json, 'evaluate_dir': folder}.

    `supporters`: models for rows by name (a spec, a component reference such as
    ``mlflow:<run_id>`` or an adapter folder, or a ModelConfig), e.g. the pipeline's trained
    ``{"Ours (SFT)": sft_spec, "Ours (DPO)": dpo_spec}``, or a dict ``{"model", "tvd", "rg"}`` for a
    row with its own components (the emotion-reinforced rows' RG); names must be rows of the
    config. Rows whose ``component`` is ``pipeline:<name>`` need one.
    `tvd`, `rg`: the target value detector and reference generator for rows that use them (None:
    ``simulate.tvd`` / ``simulate.rg``, else the row's own supporter model, zero-shot).
    """
    cfg = config.evaluate
    run = RunPaths(config.run.out_dir.resolve())
    stage_dir = run.stage("evaluate")
    overrides: dict[str, SupporterRef] = {}
    rows = {s.name: s for s in cfg.supporters}
    for name, value in (supporters or {}).items():
        if name not in rows:
            raise ValueError(f"evaluate_flow: supporter {name!r} is not a row of evaluate.supporters {list(rows)}")
        if isinstance(value, Mapping):  # {'model': ..., 'tvd': ..., 'rg': ...}; None: the row's default
            extra = {k: roles.model_config(value[k]) for k in ("tvd", "rg") if value.get(k)}
            rows[name] = rows[name].model_copy(update=extra)
            model = value.get("model")
            if model:
                overrides[name] = model
        else:
            overrides[name] = value
    personas_file = Path(personas_path) if personas_path else (cfg.personas or run.out_dir / "personas" / "personas.jsonl")
    sim_cfg = evaluation_simulate_config(config.simulate, cfg)
    use_cache = config.models.cache
    tags = {"esvr.kind": "evaluate", "esvr.evaluate.reference": cfg.reference, "esvr.evaluate.judge": config.models.judge.spec}
    with tracking.flow_run(
        "evaluate", config, section="evaluate", tags=tags, prompts=(*JUDGE_PROMPTS, *BASELINE_PROMPTS)
    ) as active:
        from esvr.tasks.simulation.personas import read_personas

        personas = read_personas(personas_file, [cfg.split])
        if cfg.max_personas is not None:
            personas = personas[: cfg.max_personas]
        if not personas:
            raise ValueError(f"{personas_file}: no persona in split {cfg.split!r} to evaluate on")
        tracking.log_metrics({"evaluate.personas": len(personas)})
        on_cluster = uses_cluster(config.orchestration)
        judge = roles.chat_model(config.models.judge, run.out_dir, cache=use_cache)
        default_tvd = roles.model_config(tvd) if tvd is not None else sim_cfg.tvd
        default_rg = roles.model_config(rg) if rg is not None else sim_cfg.rg
        print(
            f"evaluating {len(cfg.supporters)} supporters on {len(personas)} {cfg.split} personas "
            f"(max {cfg.max_turns} turns), judge {config.models.judge.spec}, seeker {config.models.seeker.spec}, "
            f"reference {cfg.reference!r}"
        )

        dialogue_paths: dict[str, Path] = {}
        used_models: dict[str, Any] = {"judge": judge}
        components: dict[str, dict[str, str | None]] = {}
        row_models: dict[str, dict[str, Any]] = {
            s.name: {
                "supporter": supporter_model(config, s, overrides.get(s.name), stage_dir),
                "seeker": config.models.seeker,
                "judge": config.models.judge,
                "tvd": s.tvd or default_tvd,
                "rg": s.rg or default_rg,
            }
            for s in rows.values()
        }
        for s in rows.values():
            dialogue_paths[s.name] = stage_dir / s.slug / "dialogues.jsonl"
        if on_cluster:
            # one task per row on the cluster; each worker loads the row's models itself
            calls = [
                {
                    "row": s,
                    "sim_cfg": sim_cfg,
                    "models": row_models[s.name],
                    "emotion_cfg": config.label.emotion if sim_cfg.emotion else None,
                    "personas": personas,
                    "out": dialogue_paths[s.name],
                    "run_dir": run.out_dir,
                    "use_cache": use_cache,
                    "seed": config.run.seed,
                }
                for s in rows.values()
            ]
            results = dict(zip(rows, map_runner(config.orchestration)(row_dialogues, calls, name="evaluate-row")))
            workers = len({r["worker_pid"] for r in results.values()})
            tracking.log_metrics({"evaluate.workers": workers})
            print(f"{len(results)} supporters simulated on {workers} {config.orchestration.task_runner} worker process(es)")
        else:
            seeker = roles.chat_model(config.models.seeker, run.out_dir, cache=use_cache)
            used_models["seeker"] = seeker
            scorer = roles.emotion_scorer(config.label.emotion if sim_cfg.emotion else None, run.out_dir, use_cache)
            results = {}
            for s in rows.values():
                m = row_models[s.name]
                sup = roles.chat_model(m["supporter"], run.out_dir, cache=use_cache)
                # without a trained component the row's own model plays it zero-shot (same prompts)
                tvd_model = roles.chat_model(m["tvd"], run.out_dir, cache=use_cache) if m["tvd"] is not None else sup
                rg_model = roles.chat_model(m["rg"], run.out_dir, cache=use_cache) if m["rg"] is not None else sup
                agents = make_agents(
                    s, sim_cfg, sup, seeker, tvd_model=tvd_model, rg_model=rg_model, rephraser=judge, emotion_scorer=scorer
                )
                used_models[f"supporter.{s.slug}"] = sup
                res = evaluation_dialogues_task(personas, dialogue_paths[s.name], agents, sim_cfg.concurrency, config.run.seed)
                results[s.name] = {**res, "names": {k: agents.names.get(k) for k in ("supporter", "tvd", "rg")}}
        for s in rows.values():
            res = results[s.name]
            components[s.name] = res["names"]
            tracking.log_metrics({k.replace("evaluate.simulate", f"{s.slug}.simulate"): v for k, v in res["metrics"].items()})
            if res["errors"]:
                print(
                    f"{s.name}: {len(res['errors'])} dialogues hit backend errors and were not written; rerun to retry: {res['errors'][:2]}"
                )
            where = f" (worker process {res['worker_pid']})" if "worker_pid" in res else ""
            print(f"{s.name}: {res['written']} new dialogues, {res['skipped']} already done -> {dialogue_paths[s.name]}{where}")

        # the judge, its settings and the run's caches: the same for every judgment
        judging: dict[str, Any] = {
            "judging": Judging(
                judge=config.models.judge,
                complete_only=cfg.complete_only,
                settings=dataclasses.asdict(cfg.judge_settings(config.run.seed)),
            ),
            "run_dir": run.out_dir,
            "use_cache": use_cache,
        }
        judgment_paths = {
            s.name: Path(
                judge_dialogues_task(
                    dialogues=dialogue_paths[s.name], supporter=s.name, out=stage_dir / s.slug / "judgments.jsonl", **judging
                )
            )
            for s in cfg.supporters
        }
        value_paths = {
            s.name: Path(
                judge_values_task(
                    dialogues=dialogue_paths[s.name],
                    reference_dialogues=dialogue_paths[cfg.reference],
                    supporter=s.name,
                    reference=cfg.reference,
                    out=stage_dir / s.slug / "es_value.jsonl",
                    **judging,
                )
            )
            for s in cfg.supporters
            if s.name != cfg.reference
        }
        from esvr.tasks.evaluation.lowest_value import lowest_value_dialogues
        from esvr.tasks.simulation.simulate import load_dialogues

        judged = {n: read_jsonl(p) for n, p in judgment_paths.items()}
        valued = {n: read_jsonl(p) for n, p in value_paths.items()}
        simulated = {n: load_dialogues(p) for n, p in dialogue_paths.items()}
        summary = summarize(
            judged,
            valued,
            cfg.reference,
            cfg.supporters,
            dialogues=simulated,
            table_score=cfg.table_score,
            extra={
                "run_id": active.info.run_id,
                "run_name": config.run.name,
                "judge": config.models.judge.spec,
                "seeker": config.models.seeker.spec,
                "personas": len(personas),
                "split": cfg.split,
                "max_turns": cfg.max_turns,
                "complete_only": cfg.complete_only,
                "value_judgments": cfg.value_judgments,
                "judge_reasoning": cfg.judge_reasoning,
                "components": components,
            },
        )
        # App. J: where the reference supporter reinforced values least, by persona category
        summary["lowest_value"] = lowest_value_dialogues(cfg.reference, judged[cfg.reference], valued, simulated[cfg.reference])
        summary_path = stage_dir / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        tracking.log_metrics(summary_metrics(summary))
        tracking.log_usage(used_models)
        tracking.log_artifact(summary_path, "evaluate")
        for s in cfg.supporters:
            tracking.log_artifact(stage_dir / s.slug, f"evaluate/{s.slug}")
        for m in summary["models"]:
            sk = m["skills"]["overall"]["score"]
            print(
                f"  {m['name']:<28} dialogues {m['n_dialogues']:>3}  overall {_fmt(sk['mean'])}{sk['mark']}  "
                f"intensity {_fmt(m['intensity']['score']['mean'])}{m['intensity']['score']['mark']}  "
                f"words/turn {_fmt(m['words_per_turn']['mean'], 1)}"
            )
        artifacts = {"evaluate_summary": str(summary_path), "evaluate_dir": str(stage_dir)}
        if cfg.human_ratings is not None:
            artifacts.update(judge_vs_human_flow(config, cfg.human_ratings, stage_dir))
        return artifacts


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# App. H: the judge against human ratings
# --------------------------------------------------------------------------------------------


@flow(name="judge-vs-human", log_prints=True)
def judge_vs_human_flow(
    config: PipelineConfig, ratings_csv: str | Path, evaluate_dir: str | Path | None = None
) -> dict[str, str]:
    """Spearman correlation per criterion between human ratings (CSV) and the judge's scores in an
    evaluation folder (default ``<run>/evaluate``); writes ``judge_vs_human.{json,md}`` there."""
    from esvr.tasks.evaluation.fidelity import judge_vs_human, judge_vs_human_markdown

    run = RunPaths(config.run.out_dir.resolve())
    folder = Path(evaluate_dir) if evaluate_dir else run.out_dir / "evaluate"
    with tracking.flow_run("judge-vs-human", config, tags={"esvr.kind": "judge-vs-human"}):
        result = judge_vs_human(ratings_csv, folder)
        out_json = folder / "judge_vs_human.json"
        out_md = folder / "judge_vs_human.md"
        out_json.write_text(json.dumps(result, indent=2))
        out_md.write_text(judge_vs_human_markdown(result))
        tracking.log_metrics(
            {f"judge_vs_human.{r['criterion']}.spearman": r["spearman"] for r in result["rows"] if r["spearman"] is not None}
        )
        tracking.log_artifact(out_json, "judge_vs_human")
        tracking.log_artifact(out_md, "judge_vs_human")
        print(out_md.read_text())
        return {"judge_vs_human": str(out_md)}


# --------------------------------------------------------------------------------------------
# App. E.2 / F.2: simulator and ES-Intensity predictor fidelity on ESConv
# --------------------------------------------------------------------------------------------


@flow(name="simulator-fidelity", log_prints=True)
def simulator_fidelity_flow(
    config: PipelineConfig, esconv_path: str | Path | None = None, intensity: bool = True
) -> dict[str, str]:
    """Table 29 (reference rows, then each candidate seeker simulator against real ESConv seeker
    turns) and Table 11 (the ES-Intensity judge against ESConv's reported final intensities); the
    inputs are checked before any model is asked, and each table is written as soon as computed."""
    from esvr.models.value_detector import SentenceEncoder
    from esvr.tasks.common.esconv import load_esconv
    from esvr.tasks.evaluation.fidelity import Candidate, Scorers, fidelity_markdown, run_simulator_fidelity

    cfg = config.evaluate.fidelity
    path = Path(esconv_path) if esconv_path else cfg.esconv
    if path is None:
        raise ValueError("simulator fidelity needs ESConv: pass --esconv PATH or set evaluate.fidelity.esconv")
    run = RunPaths(config.run.out_dir.resolve())
    out_dir = run.stage("fidelity")
    use_cache = config.models.cache
    with tracking.flow_run("simulator-fidelity", config, section="evaluate", tags={"esvr.kind": "simulator-fidelity"}):
        dialogues = load_esconv(path)

        def build(sim: Any) -> Any:
            return lambda: roles.chat_model(sim, run.out_dir, cache=use_cache)

        candidates = [
            Candidate(sim.spec, one_shot, build(sim), "one-shot" if one_shot else "zero-shot")
            for sim in cfg.simulators or [config.models.seeker]
            for one_shot in ([True, False] if cfg.zero_shot else [True])
        ] + [Candidate(sim.spec, False, build(sim), "fine-tuned") for sim in cfg.finetuned]
        judge = functools.cache(build(config.models.judge))  # one judge for the content score and Table 11
        scorers = Scorers(
            emotion=roles.emotion_scorer(config.label.emotion, config.run.out_dir, use_cache),
            detector=roles.value_detector(config.label.values, run.out_dir, use_cache),
            encoder=SentenceEncoder(cfg.encoder),
            judge=judge() if cfg.content_judge else None,
        )
        result = run_simulator_fidelity(
            dialogues,
            cfg,
            candidates,
            scorers,
            out_dir,
            source=str(path),
            intensity_judge=judge if intensity else None,
            judge_settings=config.evaluate.judge_settings(config.run.seed),
        )
        for r in result["simulators"]:
            tracking.log_metrics({f"fidelity.{r['slug']}.{k}": v for k, v in r["metrics"].items() if v is not None})
        if "intensity" in result:
            tracking.log_metrics({f"intensity.{k}": v for k, v in result["intensity"]["judge"].items() if v is not None})
        tracking.log_artifact(out_dir, "fidelity")
        print(fidelity_markdown(result))
        return {"fidelity": str(out_dir / "fidelity.md")}
