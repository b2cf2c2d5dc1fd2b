"""Flow `train_tvd`: LoRA SFT of the target value detector, then Table 5 on the test split.

Stage 4a of the DAG (paper §5.1, App. D.1). The training run is a nested MLflow run tagged
``esvr.component=tvd``, ``esvr.training_stage=sft`` and ``esvr.setting``; it holds the per-step
metrics, the trainer config and the adapter (artifact ``adapter``), so ``mlflow:<run_id>``
addresses the trained detector. The evaluation compares the detector with prompt baselines
(zero-shot, with value definitions, with reasoning) on the same test examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig, flatten
from esvr.models.config import ModelConfig
from esvr.models.memory import return_freed_memory
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.common.roles import base_model, component_spec, release_models, resolve_component
from esvr.tasks.components import tvd
from esvr.tasks.components.datasets import load_manifest
from esvr.tasks.components.training import log_training, train_lora

_ROLES = ("supporter", "seeker", "persona_writer", "judge")
#: the stage's code: every task's cache key follows its source
STAGE = "esvr.tasks.components"


# Keyed by the dataset's and the base weights' content, the SFT adapter's content, the config and
# the trainer's source; not by the MLflow run id, so a re-run reuses the adapter and
# `log_training` replays its step metrics into the new run. Libraries print bytecode listings while
# hashing functions, hence no log_prints; step metrics go to MLflow instead.
train_lora_task = task(
    name="train_lora",
    cache_policy=cache_policy(STAGE, "esvr.models.training", exclude=["run_id"]),
    persist_result=True,
    log_prints=False,
)(train_lora)
tvd_eval_task = task(
    name="tvd_eval",
    cache_policy=cache_policy(STAGE, "esvr.models.chat", "esvr.models.hf_backend", prompts=tvd.PROMPT_FILES),
    persist_result=True,
)(tvd.tvd_eval)


def model_for(name: str, config: PipelineConfig) -> ModelConfig:
    """'base' = the training base checkpoint; a role name = that configured model; else a spec or
    a trained component (``mlflow:<run_id>``, an adapter folder)."""
    if name == "base":
        return base_model(config.models.base)
    if name in _ROLES:
        return getattr(config.models, name)
    return ModelConfig(spec=resolve_component(name))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def dataset_dir(manifest: dict[str, Any], setting: str, kind: str) -> Path:
    try:
        return Path(manifest["paths"][setting][kind])
    except KeyError:
        raise ValueError(
            f"the datasets at {manifest['root']} have no {setting}/{kind}; built settings: {sorted(manifest['paths'])} "
            "(datasets.settings must include it)"
        ) from None


@dataclass(frozen=True)
class Adapter:
    """A trained LoRA adapter: its folder, its chat spec and its MLflow run."""

    dir: Path
    spec: str
    run_id: str

    @property
    def run(self) -> str:
        """The run as a component reference, ``mlflow:<run_id>``."""
        return f"mlflow:{self.run_id}"


def train_component(
    config: PipelineConfig,
    component: str,
    stage: Literal["sft", "dpo"],
    setting: str,
    data: Path,
    train_cfg: Any,
    out: Path,
    sft: Adapter | None = None,
    tags: dict[str, str] | None = None,
) -> Adapter:
    """One training as a nested MLflow run: an SFT adapter, or a DPO one starting from `sft`."""
    base = base_model(config.models.base)
    tags = {
        "esvr.component": component,
        "esvr.training_stage": stage,
        "esvr.setting": setting,
        "esvr.base_model": base.spec,
        **(tags or {}),
    }
    with tracking.flow_run(f"{component}.{stage}.{setting}", config, tags=tags) as run:
        run_id = run.info.run_id
        items = list(tracking.safe_params(flatten(train_cfg, prefix="train.")).items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        meta = {"component": component, "stage": stage, "setting": setting}
        release_models()  # the shared chat models' memory goes to training (they reload on demand)
        result = train_lora_task(stage, base, data, sft.dir if sft else None, train_cfg, out, meta, run_id)
        # the Trainer holds reference cycles; free the training copy before evaluating (a cached
        # training loaded nothing)
        return_freed_memory(if_freed=True)
        log_training(result, run_id)
        m = result["metrics"]
        print(
            f"{component} {stage} ({setting}): {int(m['global_step'])} steps, {m['step_time_s']:.2f} s/step, "
            f"train loss {m['train_loss']:.3f}" + (f", dev loss {m['eval_loss']:.3f}" if "eval_loss" in m else "")
        )
    return Adapter(Path(result["adapter_dir"]), component_spec(result["adapter_dir"]), run_id)


@flow(name="train_tvd", log_prints=True)
def train_tvd_flow(config: PipelineConfig, datasets: str | Path | None = None) -> dict[str, str]:
    """Train and evaluate the detector on the datasets at `datasets` (default: the run folder's)."""
    paths = RunPaths(config.run.out_dir.resolve())
    manifest = load_manifest(Path(datasets) if datasets else paths.out_dir / "datasets")
    cfg = config.train_tvd
    data = dataset_dir(manifest, cfg.setting, "tvd")
    max_chars = manifest["config"].get("max_chars_per_utterance")
    stage_dir = paths.stage("train_tvd")
    with tracking.flow_run("train_tvd", config, section="train_tvd", prompts=tvd.PROMPT_FILES):
        adapter = train_component(config, "tvd", "sft", cfg.setting, data, cfg.train, stage_dir / "sft")
        spec, run_id = adapter.spec, adapter.run_id

        systems: list[tuple[str, ModelConfig, tvd.Variant]] = [("tvd", ModelConfig(spec=spec), "zero_shot")]
        for name in cfg.eval.baselines:
            systems += [(name, model_for(name, config), variant) for variant in cfg.eval.variants]
        split = tvd.EvalSplit(data=data, max_examples=cfg.eval.max_examples, seed=config.run.seed, max_chars=max_chars)
        evaluations = []
        for name, model, variant in systems:
            out = stage_dir / "eval" / f"{slug(name)}.{variant}.jsonl"
            evaluations.append(
                tvd_eval_task(
                    model,
                    split,
                    name,
                    variant,
                    cfg.eval,
                    out,
                    str(paths.out_dir),
                    config.models.cache,
                )
            )
        for ev in evaluations:
            tracking.log_metrics({f"tvd.eval.{slug(ev['name'])}.{ev['variant']}.{k}": v for k, v in ev["metrics"].items()})
        trained = evaluations[0]["metrics"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for k, v in trained.items():
            client.log_metric(run_id, f"test.{k}", float(v))
        table = stage_dir / "table5.md"
        table.write_text("# Target value prediction (Table 5)\n\n" + tvd.table5_markdown(evaluations))
        tracking.log_artifact(table, "train_tvd")
        tracking.log_artifact(stage_dir / "eval", "train_tvd/eval")
        print(tvd.table5_markdown(evaluations))
        return {"tvd": spec, "tvd_run": f"mlflow:{run_id}", "tvd_eval": str(table)}
