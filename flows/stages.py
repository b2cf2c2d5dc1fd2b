"""The pipeline's stages, in order, as one table.

`esvr run` (flows/pipeline.py) walks it over the selected stages; the CLI (flows/cli.py) makes one
command of each row; `run.stages` takes its names (flows/config.py lists them, a test keeps the two
equal). Reading the table imports no flow: each row names its flow as ``module:function``, loaded
when the stage runs, so that building the CLI's parser loads no Prefect.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esvr.flows.config import PipelineConfig

#: the keys a stage reads from: what earlier stages of the run published (None: left to the flow)
Artifacts = Mapping[str, str | None]


@dataclass(frozen=True)
class Stage:
    name: str
    #: the stage's flow, ``module:function`` of a module of esvr.flows
    flow: str
    #: the one-line description its command shows in ``esvr --help``
    help: str
    #: flow keyword -> artifact key of an earlier stage; a key this run did not publish leaves the
    #: keyword to the flow's default (the run folder, where an earlier run left it, or the recipe)
    reads: Mapping[str, str] = field(default_factory=dict)
    #: keyword arguments worked out from the artifacts and the recipe, beyond `reads`
    inputs: Callable[[PipelineConfig, Artifacts], dict[str, Any]] | None = None
    #: prefix of the keys it publishes, except the `bare` ones (``simulate_sft_train``, ``dialogues``)
    prefix: str = ""
    bare: tuple[str, ...] = ()
    #: the stage runs again on each variant's recipe (App. G) and publishes these of its keys as
    #: ``<variant>_<key>``; a stage with none runs on the main recipe only
    variant_keys: tuple[str, ...] = ()
    #: a variant whose section of this name equals the main recipe's takes the main run's results
    variant_only_if_changed: bool = False
    #: free the loaded models after each run of its flow: the stages after it want the memory
    frees_models: bool = False
    #: runs only when run.stages names it
    optional: bool = False
    #: the recipe keys whose settings it needs (models, servers, files), which `esvr check`
    #: probes before anything starts (flows/preflight.py); a model key counts only when in use
    recipe_keys: tuple[str, ...] = ()
    #: (writing stage, path in the run folder) of the files it reads: a run that leaves the
    #: writing stage out expects them from an earlier run
    run_files: tuple[tuple[str, str], ...] = ()

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def load(self) -> Callable[..., dict[str, str]]:
        module, _, function = self.flow.partition(":")
        flow: Callable[..., dict[str, str]] = getattr(importlib.import_module(f"esvr.flows.{module}"), function)
        return flow

    def runs_for_variant(self, variant: PipelineConfig, main: PipelineConfig) -> bool:
        if not self.variant_keys:
            return False
        return not self.variant_only_if_changed or getattr(variant, self.name) != getattr(main, self.name)

    def arguments(self, config: PipelineConfig, artifacts: Artifacts) -> dict[str, Any]:
        """The flow's keyword arguments (beside the config) from what earlier stages published."""
        kwargs = {keyword: artifacts.get(key) for keyword, key in self.reads.items()}
        return kwargs | (self.inputs(config, artifacts) if self.inputs else {})

    def published(self, result: Mapping[str, str], variant: str | None = None) -> dict[str, str]:
        """The flow's results under the keys the run publishes them by."""
        if variant is not None:
            return {f"{variant}_{k}": v for k, v in result.items() if k in self.variant_keys}
        return {(k if k in self.bare else self.prefix + k): v for k, v in result.items()}


def pipeline_supporters(config: PipelineConfig, artifacts: Artifacts) -> dict[str, Any]:
    """Evaluation rows that take this run's trained supporters (``component: pipeline:<name>``).

    ``pipeline:<branch>_sft`` / ``_dpo``: the supporter train_supporter published for the main
    method (branch 'supporter') or a variant, simulated with its branch's reference generator (App.
    G's rows with App. G's RG).
    """
    rows: dict[str, dict[str, str | None]] = {}
    for row in config.evaluate.supporters:
        name = (row.component or "").removeprefix("pipeline:")
        if name == row.component:
            continue
        branch, _, kind = name.rpartition("_")
        # a branch whose preference data gave no DPO pair keeps its SFT model as the DPO row's
        spec = artifacts.get(name) or (artifacts.get(f"{branch}_sft") if kind == "dpo" else None)
        if spec:
            rows[row.name] = {"model": spec, "rg": artifacts.get(f"{branch}_rg", artifacts.get("rg"))}
    return {"supporters": rows or None}


def evaluation_summary(config: PipelineConfig, artifacts: Artifacts) -> dict[str, Any]:
    """The report of this run's evaluation (none evaluated: the newest evaluate run's)."""
    summary = artifacts.get("evaluate_summary")
    return {"summaries": [summary] if summary else None}


_SUPPORTER_KEYS = ("sft", "sft_run", "dpo", "dpo_run", "supporter", "supporter_run", "dpo_dialogues", "table19")
_DATASETS = {"datasets": "datasets"}
_COMPONENTS = {"tvd": "tvd", "rg": "rg"}
_DATASETS_FILE = (("build_datasets", "datasets/manifest.json"),)
_PERSONAS_FILE = (("personas", "personas/personas.jsonl"),)

#: `esvr run`'s stages in pipeline order (paper Figure 3)
PIPELINE: tuple[Stage, ...] = (
    Stage(
        "smoke",
        "smoke:smoke_flow",
        "one reply and one scored choice from the supporter model",
        optional=True,
        frees_models=True,
        recipe_keys=("models.supporter",),
    ),
    # -- Reddit data (§4) --------------------------------------------------------------------
    Stage(
        "ingest",
        "ingest:ingest_flow",
        "Pushshift .zst dumps -> threads.parquet (demo: the generated sample dump)",
        recipe_keys=("ingest.dumps", "ingest.dumps_dir"),
    ),
    Stage(
        "label",
        "label:label_flow",
        "label every utterance of threads.parquet: valence, sentiment, 20 values (stage 2)",
        reads={"threads": "threads"},
        frees_models=True,
        recipe_keys=("label.values", "label.emotion"),
        run_files=(("ingest", "ingest/threads.parquet"),),
    ),
    Stage(
        "analyze_esconv",
        "analyze_esconv:analyze_esconv_flow",
        "the paper's §3 ESConv value analysis: groups, Mann-Whitney U, Figure 2",
        frees_models=True,
        recipe_keys=("analyze_esconv.esconv", "label.values", "label.emotion"),
    ),
    # -- components trained on Reddit (§5.1-5.2) ---------------------------------------------
    Stage(
        "build_datasets",
        "build_datasets:build_datasets_flow",
        "threads + labels -> TVD, RG-SFT, RG-DPO datasets (stage 3)",
        reads={"threads": "threads", "labels": "labels"},
        run_files=(("ingest", "ingest/threads.parquet"), ("label", "label/labels.parquet")),
    ),
    Stage(
        "train_tvd",
        "train_tvd:train_tvd_flow",
        "LoRA SFT of the target value detector + Table 5 evaluation (stage 4)",
        reads=_DATASETS,
        frees_models=True,
        recipe_keys=("models.base", "train_tvd.eval.baselines"),
        run_files=_DATASETS_FILE,
    ),
    Stage(
        "train_rg",
        "train_rg:train_rg_flow",
        "reference generator SFT then DPO per setting + Tables 7-8 (stage 4)",
        reads=_DATASETS,
        variant_keys=("rg",),
        variant_only_if_changed=True,
        frees_models=True,
        recipe_keys=("models.base", "train_rg.judge"),
        run_files=_DATASETS_FILE,
    ),
    # -- seekers and simulated dialogues (§5.3-5.4) ------------------------------------------
    Stage(
        "personas",
        "personas:personas_flow",
        "generate seeker personas (stage 5): situations, alignment, emotion, demographics, split",
        recipe_keys=("models.persona_writer", "personas.emotion_model", "personas.demographics_model"),
    ),
    Stage(
        "simulate",
        "simulate:simulate_flow",
        "simulate supporter-seeker dialogues over personas (stage 6); resumable",
        reads={"personas_path": "personas", **_COMPONENTS},
        prefix="simulate_",
        bare=("dialogues",),
        variant_keys=("dialogues",),
        recipe_keys=("models.supporter", "models.seeker", "simulate.tvd", "simulate.rg", "simulate.emotion"),
        run_files=_PERSONAS_FILE,
    ),
    # -- the supporter: SFT, then DPO on the look-ahead value reward (§5.3) -------------------
    Stage(
        "train_supporter",
        "train_supporter:train_supporter_flow",
        "SFT the supporter on simulated dialogues, build look-ahead DPO pairs (Table 19), DPO (stage 7)",
        reads={"dialogues_path": "dialogues", **_COMPONENTS},
        prefix="supporter_",
        bare=("supporter",),
        variant_keys=_SUPPORTER_KEYS,
        frees_models=True,
        # the prompted supporter rolls out 'DPO (GPT)' candidates; the reward reads the value
        # detector (reward: value) or asks the judge (reward: emotion)
        recipe_keys=(
            "models.base",
            "models.seeker",
            "train_supporter.dpo_simulations",
            "simulate.tvd",
            "simulate.rg",
            "simulate.emotion",
            "train_supporter.reward",
        ),
        run_files=(("simulate", "simulate/main/dialogues.jsonl"),),
    ),
    # -- evaluation (§6) ----------------------------------------------------------------------
    Stage(
        "evaluate",
        "evaluate:evaluate_flow",
        "supporters under test x test personas -> ES-Skills, ES-Intensity, ES-Value (stage 8)",
        reads={"personas_path": "personas", **_COMPONENTS},
        inputs=pipeline_supporters,
        # seeker and judge (the judge also rephrases self-disclosure), each row's supporter /
        # component / fine-tuning corpus and own TVD / RG; the simulation settings (stage 6's plus
        # the overrides) give the rows' default TVD / RG and the valence end rule
        recipe_keys=(
            "models.seeker",
            "models.judge",
            "evaluate.supporters",
            "evaluate.simulate_overrides",
            "evaluate.personas",
            "evaluate.human_ratings",
        ),
        run_files=_PERSONAS_FILE,
    ),
    Stage(
        "report",
        "report:report_flow",
        "Markdown report (paper Tables 2/3 + plots) from evaluate runs, logged to MLflow",
        inputs=evaluation_summary,
    ),
)

STAGES_BY_NAME = {stage.name: stage for stage in PIPELINE}
