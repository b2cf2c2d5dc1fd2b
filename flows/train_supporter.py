"""Flow `train_supporter`: simulated dialogues -> SFT adapter -> look-ahead preference pairs -> DPO adapter.

Stage 7 of the DAG (paper §5.3, App. D.3; the emotion variant of App. G is ``reward: emotion``):

1. SFT on the SFT stage's dialogues (initial and alternative responses), a nested MLflow run
   tagged ``esvr.component=supporter``, ``esvr.training_stage=sft``, with its adapter.
2. The dialogues behind the preference data: the same dialogues ("DPO (GPT)") or new simulations
   with the SFT model ("DPO (SFT)").
3. Look-ahead rollouts of both candidates of every turn, once, for the longest horizon needed
   (shards of dialogues on the cluster's workers when ``orchestration.task_runner`` is dask or ray).
4. Scores per seeker utterance, then for every setting of ``train_supporter.sweep`` the pairs and
   Table 19's counts, each setting one nested MLflow run (compare them in MLflow's table).
5. DPO from the SFT model on the ``selected`` setting's pairs, a nested run with its adapter; with
   no pairs the stage says so and keeps the SFT model as the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.flows.task_runners import map_runner, uses_cluster
from esvr.models.config import ModelConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.common.roles import model_config, release_models
from esvr.tasks.simulation.simulate import SIMULATE_PROMPTS, load_dialogues
from esvr.tasks.supporter.preferences import EMOTION_PROMPTS
from esvr.tasks.supporter.train_supporter import (
    SPLITS,
    AgentSetup,
    build_sft_data,
    dialogues_by_split,
    dpo_simulations,
    preferences,
    rollouts,
    table19_metrics,
)

#: the stage's code: every task's cache key follows its source
STAGE = "esvr.tasks.supporter"


sft_data_task = task(name="supporter_sft_data", cache_policy=cache_policy(STAGE), persist_result=True)(build_sft_data)
# Not cached by Prefect: the dialogues file is itself the resumable record.
dpo_simulations_task = task(name="supporter_dpo_simulations", cache_policy=NO_CACHE, persist_result=False)(dpo_simulations)
preferences_task = task(
    name="supporter_preferences", cache_policy=cache_policy(STAGE, "esvr.models.value_detector"), persist_result=True
)(preferences)


# Not cached by Prefect: the rollouts file is resumable (candidates already in it are skipped).
rollouts_task = task(name="supporter_rollouts", cache_policy=NO_CACHE, persist_result=False)(rollouts)


def _emotion_cfg(config: PipelineConfig) -> Any | None:
    """The label stage's emotion scorer settings when the simulation's valence end rule is on."""
    label = getattr(config, "label", None)
    return label.emotion if (config.simulate.emotion and label is not None) else None


def _value_cfg(config: PipelineConfig) -> Any | None:
    cfg = config.train_supporter.value_detector
    if cfg is None and getattr(config, "label", None) is not None:
        cfg = config.label.values
    return cfg


@flow(name="train_supporter", log_prints=True)
def train_supporter_flow(
    config: PipelineConfig,
    dialogues_path: str | Path | None = None,
    personas_path: str | Path | None = None,
    tvd: ModelConfig | str | None = None,
    rg: ModelConfig | str | None = None,
) -> dict[str, str]:
    """Train the supporter; returns {'sft': spec, 'sft_run': 'mlflow:<id>', ['dpo', 'dpo_run'],
    'supporter': the final spec, 'table19': path, ...}.

    `dialogues_path`: the SFT stage's dialogues (default ``<run>/simulate/main/dialogues.jsonl``).
    `personas_path`: personas for the 'DPO (SFT)' simulations (default: the dialogues' own personas).
    `tvd`, `rg`: the trained components as specs or component references (default
    ``simulate.tvd`` / ``simulate.rg``; ``""`` for none), used by the rollouts and the 'DPO (SFT)'
    simulations.
    """
    from esvr.flows.train_tvd import train_component

    cfg = config.train_supporter
    paths = RunPaths(config.run.out_dir.resolve())
    dialogues = Path(dialogues_path) if dialogues_path else paths.out_dir / "simulate" / "main" / "dialogues.jsonl"
    if not dialogues.exists():
        hint = "" if dialogues_path else " (run the simulate stage first)"
        raise FileNotFoundError(f"train_supporter: no dialogues file {dialogues}{hint}")
    tvd_cfg = config.simulate.tvd if tvd is None else model_config(tvd)
    rg_cfg = config.simulate.rg if rg is None else model_config(rg)
    stage_dir = paths.stage("train_supporter")
    variant = cfg.reward
    tags = {
        "esvr.component": "supporter",
        "esvr.reward": variant,
        "esvr.dpo_simulations": cfg.dpo_simulations,
        "esvr.tvd": tvd_cfg.spec if tvd_cfg else "none",
        "esvr.rg": rg_cfg.spec if rg_cfg else "none",
    }
    prompts = list(SIMULATE_PROMPTS) + (list(EMOTION_PROMPTS) if variant == "emotion" else [])
    artifacts: dict[str, str] = {}
    with tracking.flow_run("train_supporter", config, section="train_supporter", tags=tags, prompts=prompts):
        # 1. SFT -------------------------------------------------------------------------------
        sft_data = sft_data_task(dialogues, stage_dir / "sft", cfg.include_stepwise)
        stats = sft_data["stats"]
        tracking.log_metrics(
            {f"sft_data.{s}.{k}": v for s, st in stats.items() for k, v in st.items() if isinstance(v, (int, float))}
        )
        print("SFT data: " + ", ".join(f"{s} {st['examples']} examples from {st['turns']} turns" for s, st in stats.items()))
        if stats["train"]["examples"] == 0:
            raise ValueError(f"train_supporter: {dialogues} gives no SFT training example (no successful train-split turn)")
        release_models()  # training wants the memory the simulation's models hold
        sft = train_component(config, "supporter", "sft", variant, Path(sft_data["data"]), cfg.sft, stage_dir / "sft" / "train")
        sft_spec = sft.spec
        artifacts.update(sft=sft_spec, sft_run=sft.run, supporter=sft_spec, supporter_run=sft.run)

        # 2. the dialogues behind the preference data ------------------------------------------
        # the rollouts' agents: the prompted supporter's, or the SFT model's with 'DPO (SFT)'
        agents = AgentSetup(
            config.simulate,
            config.models.supporter,
            config.models.seeker,
            tvd_cfg,
            rg_cfg,
            _emotion_cfg(config),
            paths.out_dir,
            config.models.cache,
        )
        if cfg.dpo_simulations == "sft":
            if personas_path:
                from esvr.tasks.simulation.personas import read_personas

                chosen = read_personas(personas_path, list(SPLITS))
            else:
                chosen = [d["persona"] for d in load_dialogues(dialogues)]
            personas = [p for ps in dialogues_by_split(chosen, cfg.dpo_max_personas).values() for p in ps]
            dpo_dialogues = stage_dir / "dpo" / "dialogues_sft.jsonl"
            agents = agents.with_supporter(ModelConfig(spec=sft_spec))
            sim = dpo_simulations_task(personas, dpo_dialogues, agents, config.run.seed)
            tracking.log_metrics(sim["metrics"])
            print(f"DPO (SFT): simulated {len(personas)} personas with the SFT model -> {dpo_dialogues}")
        else:
            dpo_dialogues = dialogues
        artifacts["dpo_dialogues"] = str(dpo_dialogues)

        # 3. look-ahead rollouts ---------------------------------------------------------------
        horizon = cfg.rollout_horizon()
        h_name = "all" if horizon is None else str(horizon)
        rollouts_path = stage_dir / "dpo" / f"rollouts_{cfg.dpo_simulations}_h{h_name}.jsonl"
        # with a dask or ray orchestration the rollouts' shards run on the cluster
        on_cluster = uses_cluster(config.orchestration)
        roll = rollouts_task(
            dpo_dialogues,
            rollouts_path,
            cfg,
            agents,
            config.run.seed,
            run=map_runner(config.orchestration) if on_cluster else None,
            n_shards=config.orchestration.max_workers,
        )
        tracking.log_metrics(roll["metrics"])
        if "workers" in roll:
            tracking.log_metrics({"rollouts.workers": roll["workers"]})
            print(f"rollouts ran on {roll['workers']} {config.orchestration.task_runner} worker process(es)")
        if roll["errors"]:
            print(f"{len(roll['errors'])} rollouts hit backend errors and were not written; rerun to retry: {roll['errors'][:3]}")
        print(
            f"rollouts (horizon {h_name}, shared by every setting): {roll['metrics']['rollouts.turns_with_candidates']:.0f} turns "
            f"with both candidates over {roll['dialogues']} dialogues -> {rollouts_path}"
        )
        release_models()

        # 4. scores, pairs and Table 19 per setting -------------------------------------------
        prefs = preferences_task(
            rollouts_path,
            dpo_dialogues,
            cfg,
            _value_cfg(config),
            config.models.judge,
            stage_dir / "dpo" / f"preferences_{variant}",
            str(paths.out_dir),
            config.models.cache,
            config.run.seed,
        )
        for name, counts in prefs["table19"].items():
            with tracking.flow_run(
                f"supporter.pairs.{name}",
                config,
                tags={"esvr.component": "supporter", "esvr.setting": name, "esvr.reward": variant},
            ):
                setting = next(s for s in cfg.settings() if s.name == name)
                mlflow.log_params(
                    {
                        "h": "all" if setting.h is None else setting.h,
                        "gamma": setting.gamma,
                        "t_diff": setting.t_diff,
                        "reward": variant,
                        "dpo_simulations": cfg.dpo_simulations,
                        "selected": name == prefs["selected"],
                    }
                )
                tracking.log_metrics(table19_metrics(counts))
                tracking.log_artifact(prefs["pairs"][name], "pairs")
        table = Path(stage_dir / "dpo" / f"preferences_{variant}" / "table19.md")
        tracking.log_artifact(table, "train_supporter")
        artifacts["table19"] = str(table)
        print(table.read_text())

        # 5. DPO ---------------------------------------------------------------------------------
        selected = prefs["table19"][prefs["selected"]]
        tracking.log_metrics({f"dpo_pairs.{s}": c["pairs"] for s, c in selected.items()})
        if not cfg.train_dpo:
            print("train_supporter.train_dpo is off: stopping after the preference data")
        elif selected["train"]["pairs"] == 0:
            print(
                f"DPO skipped: the selected setting {prefs['selected']} gave 0 training pairs "
                f"({selected['train']['candidates']} turns with both candidates); the supporter is the SFT model"
            )
        else:
            pairs = f"{variant}.{prefs['selected']}"  # the MLflow setting: the reward and the chosen pairs
            dpo = train_component(
                config, "supporter", "dpo", pairs, Path(prefs["data"]), cfg.dpo, stage_dir / "dpo" / "train", sft
            )
            artifacts.update(dpo=dpo.spec, dpo_run=dpo.run, supporter=dpo.spec, supporter_run=dpo.run)
        tracking.log_metrics({"dpo_trained": float("dpo" in artifacts)})
        return artifacts
