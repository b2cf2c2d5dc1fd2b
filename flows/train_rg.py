"""Flow `train_rg`: the reference generator, SFT then DPO per setting, then Tables 7 and 8.

Stage 4b of the DAG (paper §5.2, App. D.2). For each setting (single-turn, multi-turn): LoRA SFT
on RG-SFT, then LoRA DPO on RG-DPO starting from the SFT model, each a nested MLflow run tagged
``esvr.component=rg``, ``esvr.training_stage`` and ``esvr.setting`` with its adapter. Then, on
the test split, a judge model compares replies pairwise against the ground-truth comment in both
orders: vanilla base vs SFT and SFT vs DPO (Table 7), and each model's replies from the original
vs random target values (Table 8). The final reference generator is the DPO model of
`train_rg.final_setting` (the paper kept single-turn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import load_from_disk
from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.flows.train_tvd import STAGE, dataset_dir, model_for, train_component
from esvr.models.config import ModelConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.common.roles import base_model
from esvr.tasks.components import rg
from esvr.tasks.components.datasets import load_manifest
from esvr.tasks.components.tvd import EvalSplit

_keys = cache_policy(STAGE, "esvr.models.chat", "esvr.models.hf_backend", prompts=rg.PROMPT_FILES)
without_target_values_task = task(
    name="rg_sft_without_values", cache_policy=cache_policy(STAGE, prompts=rg.PROMPT_FILES), persist_result=True
)(rg.without_target_values)
rg_generate_task = task(name="rg_generate", cache_policy=_keys, persist_result=True)(rg.rg_generate)
rg_judge_task = task(name="rg_judge", cache_policy=_keys, persist_result=True)(rg.rg_judge)


def evaluate_setting(
    config: PipelineConfig,
    setting: str,
    data: Path,
    systems: dict[str, str],
    out_dir: Path,
    max_chars: int | None,
) -> list[dict[str, Any]]:
    """Tables 7-8 for one setting. `systems`: name -> chat spec ('vanilla', 'sft', 'dpo')."""
    cfg = config.train_rg
    paths = RunPaths(config.run.out_dir.resolve())
    judge = model_for(cfg.judge, config)
    split = EvalSplit(data=data, max_examples=cfg.eval.max_examples, seed=config.run.seed, max_chars=max_chars)
    replies: dict[tuple[str, str], str] = {}

    def generated(name: str, mode: str) -> Path:
        if (name, mode) not in replies:
            replies[(name, mode)] = rg_generate_task(
                ModelConfig(spec=systems[name]),
                split,
                mode,
                cfg.eval.max_new_tokens,
                out_dir / f"replies.{name}.{mode}.jsonl",
                str(paths.out_dir),
                config.models.cache,
            )
        return Path(replies[(name, mode)])

    comparisons: list[tuple[str, str, str, str, str]] = []  # (label, x name, x mode, y name, y mode)
    mode = "original" if cfg.with_values else "none"
    if cfg.eval.compare_systems:
        comparisons += [("vanilla_vs_sft", "vanilla", mode, "sft", mode)]
        if "dpo" in systems:
            comparisons += [("sft_vs_dpo", "sft", mode, "dpo", mode)]
    if cfg.eval.compare_random_values and cfg.with_values:
        comparisons += [(f"{n}_original_vs_random", n, "original", n, "random") for n in ("sft", "dpo") if n in systems]
    results = []
    for label, xn, xm, yn, ym in comparisons:
        x, y = (xn, yn) if xn != yn else (xm, ym)
        res = rg_judge_task(
            judge,
            split,
            generated(xn, xm),
            generated(yn, ym),
            x,
            y,
            cfg.eval,
            out_dir / f"verdicts.{label}.jsonl",
            str(paths.out_dir),
            config.models.cache,
        )
        res = {**res, "label": label}
        results.append(res)
        pr = rg.PairwiseResult(x=res["x"], y=res["y"], order1=res["order1"], order2=res["order2"])
        tracking.log_metrics(pr.metrics(f"rg.{setting}.{label}"))
    return results


@flow(name="train_rg", log_prints=True)
def train_rg_flow(config: PipelineConfig, datasets: str | Path | None = None) -> dict[str, str]:
    """Train and evaluate the generator per setting; returns the adapters' specs and run refs."""
    paths = RunPaths(config.run.out_dir.resolve())
    manifest = load_manifest(Path(datasets) if datasets else paths.out_dir / "datasets")
    cfg = config.train_rg
    if cfg.final_setting not in cfg.settings:
        raise ValueError(f"train_rg.final_setting {cfg.final_setting!r} is not among train_rg.settings {cfg.settings}")
    max_chars = manifest["config"].get("max_chars_per_utterance")
    stage_dir = paths.stage("train_rg")
    artifacts: dict[str, str] = {}
    report = ["# Reference generator (Tables 7 and 8)", ""]
    with tracking.flow_run("train_rg", config, section="train_rg", prompts=rg.PROMPT_FILES):
        for setting in cfg.settings:
            scfg = cfg.for_setting(setting)
            sft_data, dpo_data = dataset_dir(manifest, setting, "rg_sft"), dataset_dir(manifest, setting, "rg_dpo")
            if not cfg.with_values:
                sft_data = Path(without_target_values_task(sft_data, stage_dir / setting / "sft_data_no_values", max_chars))
            out = stage_dir / setting
            values_tag = {"esvr.rg_values": str(cfg.with_values).lower()}
            sft = train_component(config, "rg", "sft", setting, sft_data, scfg.sft, out / "sft", tags=values_tag)
            trained = {"sft": sft}
            if not cfg.with_values:
                print(f"rg ({setting}): trained without values (App. G.1): SFT only")
            elif len(load_from_disk(str(dpo_data))["train"]) == 0:
                print(f"rg ({setting}): no DPO pairs to train on; the SFT model stands in for DPO")
            else:
                trained["dpo"] = train_component(config, "rg", "dpo", setting, dpo_data, scfg.dpo, out / "dpo", sft=sft)
            for kind, adapter in trained.items():
                artifacts[f"rg_{setting}_{kind}"] = adapter.spec
                artifacts[f"rg_{setting}_{kind}_run"] = adapter.run
            systems = {"vanilla": base_model(config.models.base).spec} | {k: a.spec for k, a in trained.items()}
            if setting == cfg.final_setting:
                best = "dpo" if "dpo" in systems else "sft"
                artifacts["rg"] = systems[best]
                artifacts["rg_run"] = artifacts[f"rg_{setting}_{best}_run"]
            if cfg.eval.compare_systems or cfg.eval.compare_random_values:
                results = evaluate_setting(config, setting, sft_data, systems, out / "eval", max_chars)
                report += [rg.pairwise_markdown(setting.replace("_", "-"), results), ""]
        table = stage_dir / "tables7_8.md"
        table.write_text("\n".join(report))
        tracking.log_artifact(table, "train_rg")
        for setting in cfg.settings:
            if (stage_dir / setting / "eval").exists():
                tracking.log_artifact(stage_dir / setting / "eval", f"train_rg/{setting}/eval")
        print("\n".join(report))
        artifacts["rg_eval"] = str(table)
        return artifacts
